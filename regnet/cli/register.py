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
(:func:`working_grid`; images anti-aliased first where they are finer, :func:`on_grid`; with
``spacing=auto`` an ``lncc`` deformable stage gets a finer grid, :func:`register_pair`);
intensities are clipped to ``percentiles`` and scaled to [0, 1].
:func:`regnet.optimize.register` estimates the transform there (start search, affine stage on
``affine_loss``, deformable stage on ``loss``; see ``configs/register.yaml``), the result is
checked against the header alignment (:mod:`regnet.optimize.safeguard`), and
:func:`regnet.pipeline.complete_registration` maps it onto the fixed image's own grid and warps the
original moving image and labels once. Outputs are those of :mod:`regnet.outputs`. Bad input ends
with one line ``error: <file or argument>: <problem>`` and exit status 2.

``pairs=LIST`` (the list format of ``predict.py``; no masks) registers every row in Lightning's
prediction loop (:mod:`regnet.cli.cohort`: ``devices``/``num_nodes`` processes, resumable,
failures listed in ``out/summary.csv``), outputs in ``out/<pair>/``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
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
from regnet.data.validate import check_mask_content
from regnet.optimize import INITS, TRANSFORMS, register
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
from regnet.spatial.cubic import resample_cubic
from regnet.spatial.smooth import gaussian_smooth
from regnet.spatial.world import GRID_AXES, ddf_to_world, warp_world, world_points_to_voxel


def working_grid(
    fixed: Volume, spacing: float | Sequence[float] | None
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Affine ``(4, 4)`` and shape of the working grid: the fixed image's axes permuted and
    flipped to the closest RAS orientation (as ``nibabel.as_closest_canonical``; 2D: within the
    image plane), resampled to ``spacing`` mm (one number, or one per working-grid axis in RAS
    order; ``None``: keep the fixed spacing) over the same extent, first voxel centre kept
    (corner voxel centres of the fixed image stay on or within half a voxel of the grid)."""
    orientation = _canonical_orientation(fixed)
    reorder = np.eye(4)
    axes = np.ix_(GRID_AXES[fixed.ndim], GRID_AXES[fixed.ndim])
    reorder[axes] = nib.orientations.inv_ornt_aff(orientation, fixed.shape)
    canonical = fixed.affine @ reorder
    shape = [fixed.shape[int(axis)] for axis in orientation[:, 0]]
    columns = canonical[:3, : fixed.ndim]
    old_spacing = np.linalg.norm(columns, axis=0)
    if spacing is None:
        return canonical, tuple(shape)
    new_spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), old_spacing.shape)
    new_shape = [
        max(1, round((n - 1) * s / g) + 1)
        for n, s, g in zip(shape, old_spacing, new_spacing, strict=True)
    ]
    affine = canonical.copy()
    affine[:3, : fixed.ndim] = columns / old_spacing * new_spacing
    return affine, tuple(int(n) for n in new_shape)


def _canonical_orientation(fixed: Volume) -> np.ndarray:
    """``nibabel`` orientation ``(ndim, 2)`` taking the fixed image's axes to the closest RAS
    order: row ``k`` names the image axis that becomes working-grid axis ``k``."""
    axes = np.ix_(GRID_AXES[fixed.ndim], GRID_AXES[fixed.ndim])
    return nib.orientations.io_orientation(fixed.affine[axes])


AUTO_SPACING_MM = (1.5, 2.0)
"""``spacing=auto`` in 3D: along each axis the fixed image's voxel size, clipped to this range. On
the real-scan benchmark at 1 mm (``docs/benchmarks.md``, "Real scans at 1 mm") a 1.5 mm working
grid beat ANTs SyN on Dice and end-point error in every scenario (2 mm trailed it with T2-like
contrast) in about half its time; at 2 mm the inputs' own grid is the working grid. Per axis, a
thick-slice scan's slice axis is worked at 2 mm, not at its in-plane 1.5 mm (1x1x5 mm slices:
see "Real scans at 1 mm"). 2D images keep pixels finer than the upper bound: a slice is small,
and on the real inter-subject slices (``docs/benchmarks.md``, "Real inter-subject pairs") their
own 1 mm grid raised tissue Dice in all 30 pairs (0.774 against 0.758 on 1.5 mm)."""

AUTO_LNCC_SPACING_MM = (1.25, 2.0)
"""``spacing=auto`` in 3D when the deformable similarity is ``lncc`` (two people's brains:
``loss=auto``'s choice, or given): the clip range instead of :data:`AUTO_SPACING_MM`. Between
Colin27 and the ICBM 2009a template at 1 mm (``docs/benchmarks.md``, "``lncc`` on a 1.25 mm
grid") it raised tissue Dice from 0.755 to 0.771, past Greedy's 0.766 on the scans' 1 mm grid,
in 0.39x Greedy's registration time; scans of one brain, where ``auto`` picks ``mind``, keep
1.5 mm (there 1.25 mm cost 1.5-2.3x the time and lost accuracy on thick slices)."""

LNCC_TERM = "lncc"


def working_spacing(
    setting: Any, fixed: Volume, similarity: str | None = None
) -> tuple[float, ...] | float | None:
    """The working grid's spacing (mm) for ``spacing=`` ``setting``: a number, ``None`` (the
    fixed image's own grid) or ``"auto"`` (:data:`AUTO_SPACING_MM`, or
    :data:`AUTO_LNCC_SPACING_MM` for ``similarity`` ``"lncc"``; one value per working-grid axis
    in RAS order; 2D images keep pixels finer than 2 mm)."""
    if setting is None:
        return None
    if setting == "auto":
        low, high = AUTO_LNCC_SPACING_MM if similarity == LNCC_TERM else AUTO_SPACING_MM
        if fixed.ndim == 2:
            low = 0.0
        image_spacing = [fixed.spacing[int(axis)] for axis in _canonical_orientation(fixed)[:, 0]]
        return tuple(min(max(float(s), low), high) for s in image_spacing)
    return float(setting)


FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
INTERPOLATIONS = ("linear", "cubic")
"""Resampling of the images onto the working grid (``interpolation=``)."""


def on_grid(
    volume: Volume,
    affine: np.ndarray,
    shape: Sequence[int],
    mode: str = "linear",
    anti_alias: bool = False,
):
    """``volume`` resampled in world space onto a grid, ``(1, 1, *shape)`` float32, zeros
    outside its field of view; ``mode`` ``"linear"``, ``"nearest"`` (labels, masks) or
    ``"cubic"`` (cubic B-splines, which blur less than linear interpolation where the grids do
    not coincide: a rotated or shifted header, another voxel size; where every grid point falls
    on a voxel centre, linear interpolation is used, as it is exact there). With ``anti_alias``,
    image axes finer than the grid's spacing ``g`` along them are first smoothed by a Gaussian of
    FWHM ``sqrt(g^2 - s^2)`` mm (``s`` the axis spacing), so that noise and fine texture do not
    alias onto the coarser grid (:func:`grid_spacing_along`)."""
    data = volume.data.float()  # smoothed in float32, resampled at float64 positions
    if anti_alias:
        targets = grid_spacing_along(affine, volume.affine, volume.ndim)
        sigmas = [
            math.sqrt(max(g**2 - s**2, 0.0)) / FWHM_PER_SIGMA / s
            for g, s in zip(targets, volume.spacing, strict=True)
        ]
        data = gaussian_smooth(data, sigmas)
    axes = np.ix_(GRID_AXES[volume.ndim], GRID_AXES[volume.ndim])
    grid_to_volume = np.linalg.solve(volume.affine[axes], affine[axes])
    on_voxels = np.allclose(grid_to_volume, np.round(grid_to_volume), atol=1e-6)
    if mode == "cubic" and not on_voxels:
        return resample_cubic(data, torch.from_numpy(grid_to_volume), tuple(shape))
    zero = torch.zeros(1, volume.ndim, *shape, dtype=torch.float64)
    mode = "linear" if mode == "cubic" else mode
    return warp_world(data.double(), volume.affine, zero, affine, mode=mode).float()


def grid_spacing_along(grid: np.ndarray, image: np.ndarray, ndim: int) -> list[float]:
    """Spacing (mm) of the grid with voxel -> RAS affine ``grid`` along each axis of the image
    with affine ``image``, in the image's stored axis order: ``sqrt(sum_k cos^2(a_k) g_k^2)``
    over the grid's axes ``k`` (spacing ``g_k``, angle ``a_k`` to the image axis), i.e. ``g_k``
    for an image axis along grid axis ``k``."""
    columns = grid[:3, :ndim]
    spacing = np.linalg.norm(columns, axis=0)
    axes = image[:3, :ndim] / np.linalg.norm(image[:3, :ndim], axis=0)
    cosines = (columns / spacing).T @ axes  # (grid axis, image axis)
    return [float(v) for v in np.sqrt((cosines**2 * spacing[:, None] ** 2).sum(0))]


def scale_intensities(image: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """Clip ``image`` to its ``percentiles`` (computed over voxels inside the field of view,
    i.e. non-zero after resampling) and scale to [0, 1]."""
    values = image[image != 0]
    if values.numel() == 0:
        return image
    low, high = np.percentile(values.numpy(), [float(p) for p in percentiles])
    if high <= low:
        return (image != 0).float()
    return ((image - low) / (high - low)).clamp(0, 1)


def engine_settings(
    cfg: DictConfig,
    grid_spacing: Sequence[float],
    image_spacing: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of :func:`regnet.optimize.register` that ``cfg`` (a composed
    ``configs/register.yaml``) sets for a working grid of ``grid_spacing`` mm per axis whose
    fixed image had ``image_spacing`` mm along those axes before resampling (default: the
    grid's own): everything but the images, masks, landmarks and device, so that scripts run
    the engine exactly as ``register.py`` does."""
    loss = str(cfg.loss) if cfg.loss else None
    grid_spacing = [float(s) for s in grid_spacing]
    sigma = mind_sigma(cfg.mind_sigma, grid_spacing, image_spacing or grid_spacing)
    return {
        "spacing": grid_spacing,
        "transform": str(cfg.transform),
        "loss": loss,
        "weights": None if cfg.weights is None else OmegaConf.to_container(cfg.weights),
        "levels": int(cfg.levels),
        "iterations": _tuple(cfg.iterations, "iterations"),
        "lr": None if cfg.lr is None else float(cfg.lr),
        "landmark_weight": float(cfg.landmark_weight),
        "init": str(cfg.init),
        "affine_loss": str(cfg.affine_loss) if cfg.affine_loss else None,
        "overlap_margin": None if cfg.overlap_margin is None else float(cfg.overlap_margin),
        "search_iterations": int(cfg.search_iterations),
        "integration_steps": int(cfg.integration_steps),
        "exact_svf_gradient": (
            AUTO if cfg.exact_svf_gradient == AUTO else bool(cfg.exact_svf_gradient)
        ),
        "mind_sampling": bool(cfg.mind_sampling),
        "polish_iterations": int(cfg.polish_iterations),
        "affine_sampling": bool(cfg.affine_sampling),
        "affine_first": bool(cfg.affine_first),
        "affine_model": str(cfg.affine_model),
        "affine_iterations": _tuple(cfg.affine_iterations, "affine_iterations"),
        "affine_lr": None if cfg.affine_lr is None else float(cfg.affine_lr),
        "windows": _tuple(cfg.windows, "windows"),
        "smoothing": float(cfg.smoothing),
        "control_spacing": float(cfg.control_spacing),
        "loss_options": _mind_options(loss, sigma),
    }


MIND_BLUR = 0.3
"""``mind_sigma=auto``: the Gaussian blur (sigma, working-grid voxels) that the images carry
into MIND-SSC along every axis, counting the anti-aliasing of a resampling to a coarser grid
(:func:`on_grid`). On the real-scan benchmark at 2 mm (``docs/benchmarks.md``, "Real scans"),
where the scans' own grid is the working grid and nothing blurs them, 0.3 voxels lowered the
end-point error in 7 of 9 scenarios for both draws (with a rotated header 0.335 -> 0.288 mm),
raising it with T2-like contrast (by 0.008-0.017 mm) and on the combined pair; 1 mm scans on the
1.5 mm grid already carry 0.32 voxels of anti-aliasing, and 0.3 more changed little there."""


def mind_sigma(
    setting: Any, grid_spacing: Sequence[float], image_spacing: Sequence[float]
) -> tuple[float, ...]:
    """Per working-grid axis, the Gaussian sigma (voxels) applied to both images before their
    MIND-SSC descriptors for ``mind_sigma=`` ``setting``: a number (every axis), or ``"auto"``:
    what takes the fixed image's blur to :data:`MIND_BLUR` in quadrature, its blur being the
    anti-aliasing of ``image_spacing`` mm onto ``grid_spacing`` mm (:func:`on_grid`)."""
    if setting != "auto":
        return tuple(float(setting) for _ in grid_spacing)
    sigmas = []
    for grid, image in zip(grid_spacing, image_spacing, strict=True):
        anti_alias = math.sqrt(max(grid**2 - image**2, 0.0)) / FWHM_PER_SIGMA / grid
        sigmas.append(math.sqrt(max(MIND_BLUR**2 - anti_alias**2, 0.0)))
    return tuple(sigmas)


def _mind_options(loss: str | None, sigma: Sequence[float]) -> dict[str, dict[str, Any]] | None:
    """``loss_options`` setting the ``mind`` term's image smoothing, when ``loss`` holds it (or
    is ``auto``, which may choose it)."""
    names = [name.strip() for name in (loss or "").split("+")]
    if ("mind" in names or AUTO in names) and max(sigma) > 0:
        return {"mind": {"sigma": tuple(sigma)}}
    return None


def _tuple(value: Any, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if not isinstance(items, list | tuple):
        raise InputError(name, f"expected a list with one value per level, got {items!r}")
    return tuple(int(v) for v in items)


def check_settings(cfg: DictConfig) -> None:
    if cfg.transform not in TRANSFORMS:
        raise InputError(f"transform={cfg.transform}", f"expected one of {', '.join(TRANSFORMS)}")
    if cfg.init not in INITS:
        raise InputError(f"init={cfg.init}", f"expected one of {', '.join(INITS)}")
    if cfg.spacing not in (None, "auto"):
        try:
            positive = float(cfg.spacing) > 0
        except ValueError:
            positive = False
        if not positive:
            raise InputError(
                f"spacing={cfg.spacing}", "must be auto, null or a positive number of mm"
            )
    if int(cfg.levels) < 1:
        raise InputError(f"levels={cfg.levels}", "must be >= 1")
    if cfg.mind_sigma != "auto":
        try:
            valid = float(cfg.mind_sigma) >= 0
        except ValueError:
            valid = False
        if not valid:
            raise InputError(f"mind_sigma={cfg.mind_sigma}", "must be auto or a number >= 0")
    if cfg.exact_svf_gradient not in (True, False, AUTO):
        raise InputError(
            f"exact_svf_gradient={cfg.exact_svf_gradient}", "must be auto, true or false"
        )
    if cfg.interpolation not in INTERPOLATIONS:
        choices = " or ".join(INTERPOLATIONS)
        raise InputError(f"interpolation={cfg.interpolation}", f"expected {choices}")
    for key in ("iterations", "affine_iterations", "windows"):
        value = _tuple(cfg.get(key), key)
        if value is not None and len(value) != int(cfg.levels):
            raise InputError(f"{key}={list(value)}", f"needs one value per level ({cfg.levels})")


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


def carry_matrix(matrix: torch.Tensor, source: np.ndarray, target: np.ndarray) -> torch.Tensor:
    """A voxel matrix ``(1, n + 1, n + 1)`` of one working grid (voxel -> RAS affine ``source``)
    expressed on another over the same images (``target``): ``T^-1 S M S^-1 T``."""
    ndim = matrix.shape[-1] - 1
    axes = np.ix_(GRID_AXES[ndim], GRID_AXES[ndim])
    source_grid, target_grid = source[axes], target[axes]
    world = source_grid @ matrix[0].double().cpu().numpy() @ np.linalg.inv(source_grid)
    carried = np.linalg.inv(target_grid) @ world @ target_grid
    return torch.from_numpy(carried).to(matrix)[None]


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
    (:data:`AUTO_LNCC_SPACING_MM`): a given ``lncc`` loss starts on the finer grid; with
    ``loss=auto`` the start and the affine stage run on the usual one and, when they choose
    ``lncc``, the deformable stage runs on the finer grid from their matrix."""
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
