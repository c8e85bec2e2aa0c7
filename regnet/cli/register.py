"""``register.py`` / ``regnet-register``: classical per-pair registration by gradient descent.

Examples::

    python register.py fixed=f.nii.gz moving=m.nii.gz out=result            # affine then SVF
    python register.py fixed=f.nii.gz moving=m.nii.gz transform=rigid spacing=1
    python register.py fixed=f.png moving=m.png spacing=null out=result       # 2D, any ITK format
    python register.py fixed=f.nii.gz moving=m.nii.gz transform=bspline loss=lncc+bending \\
        labels=[fl.nii.gz,ml.nii.gz] landmarks=[f.csv,m.csv] masks=[fm.nii.gz,mm.nii.gz]
    python register.py pairs=list.csv out=results devices=2     # one subfolder per row

Both images (and masks) are resampled in world space onto one working grid: the fixed image's
field of view, axes permuted/flipped to the nearest RAS orientation, at ``spacing`` mm
(:mod:`regnet.cli.working_grid`; images anti-aliased first where they are finer; with
``spacing=auto`` an ``lncc`` deformable stage gets a finer grid, :func:`register_pair`);
intensities are clipped to ``percentiles`` and scaled to [0, 1].
:func:`regnet.optimize.register` estimates the transform there (start search, affine stage on
``affine_loss``, deformable stage on ``loss``; ``configs/register.yaml`` as its arguments:
:mod:`regnet.cli.register_settings`), the result is
checked against the header alignment (:mod:`regnet.optimize.safeguard`), and
:func:`regnet.pipeline.complete_registration` maps it onto the fixed image's own grid and warps the
original moving image and labels once. Outputs are those of :mod:`regnet.outputs`. Bad input ends
with one line ``error: <file or argument>: <problem>`` and exit status 2.

``pairs=LIST`` (the list format of ``predict.py``; no masks) registers every row in Lightning's
prediction loop (:mod:`regnet.cli.cohort`: ``devices``/``num_nodes`` processes, resumable,
failures listed in ``out/summary.csv``), outputs in ``out/<pair>/``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from regnet.cli.common import (
    InputError,
    PairSpec,
    as_pair,
    pairs_from_list,
    resolve_device,
    run_pair_command,
    summary_line,
)
from regnet.cli.register_settings import check_settings, engine_settings
from regnet.cli.working_grid import (
    LNCC_TERM,
    carry_matrix,
    grid_spacing_along,
    on_grid,
    scale_intensities,
    working_grid,
    working_spacing,
)
from regnet.data.validate import check_mask_content
from regnet.optimize import register
from regnet.optimize.contrast import AUTO, SAME_CONTRAST_LOSS
from regnet.optimize.engine import DEFORMABLE_TRANSFORMS
from regnet.optimize.engine import RegistrationResult as EngineResult
from regnet.optimize.initialize import foreground_mask
from regnet.optimize.levels import terms_of
from regnet.optimize.safeguard import check_against_start
from regnet.outputs import check_output_dir, write_registration
from regnet.pipeline import (
    GridField,
    PairInputs,
    RegistrationResult,
    Stopwatch,
    Volume,
    complete_registration,
    load_volume,
)
from regnet.spatial import affine_to_ddf
from regnet.spatial.world import GRID_AXES, ddf_to_world, world_points_to_voxel


@dataclass
class WorkingPair:
    """A pair on one working grid: ``affine`` (voxel -> RAS mm) and ``shape`` of the grid, the
    images ``(1, 1, *shape)`` scaled to [0, 1], the engine's mask and landmark arguments
    (``options``) and its settings for this grid (``settings``)."""

    affine: np.ndarray
    shape: tuple[int, ...]
    fixed: torch.Tensor
    moving: torch.Tensor
    options: dict[str, Any]
    settings: dict[str, Any]


def working_pair(
    inputs: PairInputs,
    masks: tuple[Volume, Volume] | None,
    spacing: tuple[float, ...] | float | None,
    cfg: DictConfig,
) -> WorkingPair:
    """``inputs`` (and ``masks``) resampled onto the working grid of ``spacing`` mm."""
    affine, shape = working_grid(inputs.fixed, spacing)
    interpolation = str(cfg.interpolation)
    fixed = scale_intensities(
        on_grid(inputs.fixed, affine, shape, interpolation, anti_alias=True), cfg.percentiles
    )
    moving = scale_intensities(
        on_grid(inputs.moving, affine, shape, interpolation, anti_alias=True), cfg.percentiles
    )
    options: dict[str, Any] = {}
    if masks is not None:
        options["fixed_mask"] = on_grid(masks[0], affine, shape, "nearest")
        options["moving_mask"] = on_grid(masks[1], affine, shape, "nearest")
    if inputs.fixed_landmarks is not None:
        options["fixed_landmarks"] = torch.from_numpy(
            world_points_to_voxel(inputs.fixed_landmarks, affine)
        ).float()
        options["moving_landmarks"] = torch.from_numpy(
            world_points_to_voxel(inputs.moving_landmarks, affine)
        ).float()
    settings = engine_settings(
        cfg,
        np.linalg.norm(affine[:3, : len(shape)], axis=0),
        grid_spacing_along(inputs.fixed.affine, affine, len(shape)),
    )
    return WorkingPair(affine, tuple(shape), fixed, moving, options, settings)


def _run_engine(pair: WorkingPair, device: torch.device, **extra: Any) -> EngineResult:
    """:func:`regnet.optimize.register` on ``pair`` with its settings and ``extra`` arguments."""
    try:
        return register(
            pair.fixed.to(device),
            pair.moving.to(device),
            **pair.settings,
            **extra,
            device=device,
            **pair.options,
        )
    except ValueError as error:
        raise InputError("settings", str(error)) from None


def register_pair(
    inputs: PairInputs, masks: tuple[Volume, Volume] | None, device: torch.device, cfg: DictConfig
) -> RegistrationResult:
    """Register one pair on the working grid and bring the result to the fixed image's grid;
    ``seconds`` covers resampling onto the working grid, the optimisation and the mm field.

    With ``spacing=auto`` the grid follows the deformable similarity
    (:data:`regnet.cli.working_grid.AUTO_LNCC_SPACING_MM`): a given ``lncc`` loss starts on
    the finer grid; with ``loss=auto`` the start and the affine stage run on the usual one and,
    when they choose ``lncc``, the deformable stage runs on the finer grid from their matrix."""
    watch = Stopwatch(device)
    spacing = working_spacing(cfg.spacing, inputs.fixed)
    lncc_spacing = working_spacing(cfg.spacing, inputs.fixed, LNCC_TERM)
    loss = str(cfg.loss) if cfg.loss else ""
    deformable = cfg.transform in DEFORMABLE_TRANSFORMS
    if deformable and LNCC_TERM in loss.replace(" ", "").lower().split("+"):
        spacing = lncc_spacing
    pair = working_pair(inputs, masks, spacing, cfg)
    defer = ()
    if deformable and loss == AUTO and lncc_spacing != spacing:
        defer = (SAME_CONTRAST_LOSS,)
    result = _run_engine(pair, device, defer_losses=defer)
    if result.local_ddf is None and result.loss in defer:
        start, start_grid = result, pair.affine
        pair = working_pair(inputs, masks, lncc_spacing, cfg)
        for key in ("weights", "loss_options"):  # the chosen loss's entries
            pair.settings[key] = terms_of(start.loss, pair.settings[key]) or None
        pair.settings["loss"] = start.loss
        matrix = (
            None if start.matrix is None else carry_matrix(start.matrix, start_grid, pair.affine)
        )
        result = _run_engine(pair, device, initial_matrix=matrix)
        result.history = start.history + result.history
        result.contrast_correlation = start.contrast_correlation
    affine, shape, fixed, moving = pair.affine, pair.shape, pair.fixed, pair.moving
    options, settings = pair.options, pair.settings
    ddf, matrix = result.ddf, result.matrix
    check = None
    if cfg.start_check:
        candidates = {"header": None}
        if result.matrix is not None and result.local_ddf is not None:
            candidates["affine"] = affine_to_ddf(result.matrix, shape)
        candidates["result"] = result.ddf
        user_masks = {}
        if masks is not None:
            user_masks = {key: options[key].to(device) for key in ("fixed_mask", "moving_mask")}
        check = check_against_start(
            fixed.to(device),
            moving.to(device),
            candidates,
            region=foreground_mask(fixed).to(device),
            **user_masks,
        )
        if not check.result_kept:
            print(f"warning: {inputs.moving.path}: {check.message()}", file=sys.stderr)
            ddf = candidates[check.kept]
            if ddf is None:
                ddf, matrix = torch.zeros_like(result.ddf), None
    disp = ddf_to_world(ddf, affine)
    seconds = watch.seconds()
    info: dict[str, Any] = {
        "method": f"register:{cfg.transform}",
        "loss": result.loss or settings["loss"],
        "loss_options": settings["loss_options"],
        "working_grid": {"shape": list(shape), "affine": affine.tolist()},
        "device": str(device),
        "loss_history_last": {
            f"{h.stage}/level{h.level}": (h.losses[-1] if h.losses else None)
            for h in result.history
        },
        "level_seconds": level_seconds(result.history),
        "level_steps": level_steps(result.history),
    }
    if result.contrast_correlation is not None:
        info["contrast_correlation"] = result.contrast_correlation
    if result.exact_svf_gradient is not None:
        info["exact_svf_gradient"] = result.exact_svf_gradient
    if check is not None:
        info["start_check"] = check.as_dict()
    if matrix is not None:
        grid = affine[np.ix_(GRID_AXES[len(shape)], GRID_AXES[len(shape)])]
        world = grid @ matrix[0].double().cpu().numpy() @ np.linalg.inv(grid)
        info["affine_ras_mm"] = world.tolist()  # fixed world point -> moving world point (RAS)
    return complete_registration(inputs, GridField(disp, affine), seconds, **info)


def level_seconds(history: Sequence[Any]) -> dict[str, float]:
    """Seconds spent per ``stage/level`` of a registration's history (the start search polishes
    several candidates on one level: their times add up)."""
    seconds: dict[str, float] = {}
    for record in history:
        key = f"{record.stage}/level{record.level}"
        seconds[key] = seconds.get(key, 0.0) + record.seconds
    return seconds


def level_steps(history: Sequence[Any]) -> dict[str, int]:
    """Optimiser steps run per ``stage/level`` of a registration's history (the start search's
    candidates add up), so that ``metrics.json`` says what ``iterations=null`` chose."""
    steps: dict[str, int] = {}
    for record in history:
        key = f"{record.stage}/level{record.level}"
        steps[key] = steps.get(key, 0) + len(record.losses)
    return steps


def run_list(cfg: DictConfig) -> Path:
    """``pairs=LIST``: every row through :mod:`regnet.cli.cohort` (ranks, resume,
    ``summary.csv``), outputs in ``<out>/<pair>/``; returns ``out``."""
    from regnet.cli.cohort import run_pair_folders  # Lightning is imported for lists only

    given = [key for key in ("fixed", "moving", "labels", "landmarks", "masks") if cfg.get(key)]
    if given:
        raise InputError(
            f"{given[0]}/pairs",
            "give fixed= and moving= or pairs=LIST (labels and landmarks as its columns)",
        )
    specs = pairs_from_list(cfg.pairs)

    def run(inputs: PairInputs, device: torch.device) -> RegistrationResult:
        return register_pair(inputs, None, device, cfg)

    return run_pair_folders(cfg, specs, f"register:{cfg.transform}", run, summary_line)


def run(cfg: DictConfig) -> Path:
    """Run ``register`` for a composed ``configs/register.yaml``; returns the output folder."""
    if cfg.pairs is not None:
        check_settings(cfg)
        resolve_device(cfg.device)
        return run_list(cfg)
    for key in ("fixed", "moving"):
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) is None:
            raise InputError(key, f"missing; pass {key}=PATH to an image file")
    check_settings(cfg)
    device = resolve_device(cfg.device)
    labels = as_pair(cfg.labels, "labels")
    landmarks = as_pair(cfg.landmarks, "landmarks")
    mask_paths = as_pair(cfg.masks, "masks")
    spec = PairSpec(
        "pair",
        Path(cfg.fixed),
        Path(cfg.moving),
        None if labels is None else (Path(labels[0]), Path(labels[1])),
        None if landmarks is None else (Path(landmarks[0]), Path(landmarks[1])),
    )
    spec.check_files()
    out_dir = Path(cfg.out)
    check_output_dir(out_dir, bool(cfg.overwrite))
    inputs = spec.load()
    masks = None if mask_paths is None else tuple(load_volume(p) for p in mask_paths)
    for mask in masks or ():
        check_mask_content(mask.path, mask.data)
    result = register_pair(inputs, masks, device, cfg)
    write_registration(out_dir, inputs, result, bool(cfg.overwrite), bool(cfg.overview))
    print(f"{out_dir}: {summary_line(result.metrics)}")
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: ``regnet-register [key=value ...]`` (Hydra override syntax); from the
    command line a single pair's run ends the process when done
    (:func:`regnet.cli.common.run_pair_command`)."""
    run_pair_command("register", run, argv)


if __name__ == "__main__":
    main()
