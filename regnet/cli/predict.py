"""``predict.py`` / ``regnet-predict``: register image files with a trained network.

Examples::

    python predict.py ckpt=model.ckpt pair=[fixed.nii.gz,moving.nii.gz] out=result
    python predict.py ckpt=model.ckpt pair=[f.nii.gz,m.nii.gz] labels=[fl.nii.gz,ml.nii.gz] \\
        landmarks=[f.csv,m.csv] refine.steps=10 device=cuda
    python predict.py ckpt=model.ckpt pairs=list.csv out=results   # one subfolder per row
    python predict.py ckpt=model.ckpt pairs=list.csv out=results devices=2 num_workers=2
    python predict.py ckpt=model2d.ckpt pair=[fixed.png,moving.png] out=result   # 2D network
    python predict.py ckpt=model.ckpt learn2reg=OASIS/OASIS_dataset.json split=test \\
        submission=OASIS_submission    # Learn2Reg fields only (regnet/cli/submission.py)

The network and its preprocessing (spacing, shape, intensity percentiles) are rebuilt from the
checkpoint's saved training config (``configs/predict.yaml`` ``preprocess.*`` overrides them).
Both images are preprocessed onto network grids, the network's field is converted to mm and
resampled onto the fixed image's own grid, and the original moving image and labels are warped
once; outputs are those of :mod:`regnet.outputs`. Images may be in any format of
:mod:`regnet.data.io` and must have the network's dimension (2D or 3D). Bad input ends with one line
``error: <file>: <problem>`` and exit status 2 (:mod:`regnet.cli.common`).

A list (``pairs=``, ``learn2reg=`` without ``submission=``) runs in Lightning's prediction loop
(:mod:`regnet.cli.cohort`): ``devices``/``num_nodes`` processes share the pairs, each pair's
folder is written whole by the process that registered it, ``out/manifest/`` records it, a rerun
registers only the pairs not done with the same settings, a failing pair is listed in
``out/summary.csv`` (one row per pair) while the others go on (``fail_fast=true``: the run stops
there).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from regnet.cli.common import (
    InputError,
    PairSpec,
    as_pair,
    compose_config,
    pairs_from_list,
    resolve_device,
    run_pair_command,
    summary_line,
)
from regnet.cli.submission import check_submission, submission_folder, write_submission_field
from regnet.optimize import REFINE_TRANSFORMS, refine, register
from regnet.optimize.engine import prestage_iterations
from regnet.optimize.initialize import foreground_mask
from regnet.optimize.safeguard import check_against_start
from regnet.outputs import check_output_dir, write_registration
from regnet.pipeline import (
    Network,
    PairInputs,
    RegistrationResult,
    Stopwatch,
    complete_registration,
    load_network,
    network_field_to_world,
    run_network,
)
from regnet.spatial import affine_to_ddf, apply_affine, identity_grid, warp


def pair_specs(cfg: DictConfig) -> list[tuple[PairSpec, Path]]:
    """The pairs of ``pair=[..]`` or ``pairs=list`` with their output folders.

    Raises:
        InputError: when neither or both of ``pair`` and ``pairs`` are given.
    """
    out = Path(cfg.out)
    if cfg.learn2reg is not None:
        if cfg.pair is not None or cfg.pairs is not None:
            raise InputError("pair/pairs/learn2reg", "give only one of them")
        if cfg.split not in ("val", "test"):
            raise InputError(f"split={cfg.split}", "expected val or test")
        from regnet.cli.evaluate import learn2reg_pairs  # evaluate.py builds on this module

        return [(spec, out / spec.name) for spec in learn2reg_pairs(cfg.learn2reg, str(cfg.split))]
    if (cfg.pair is None) == (cfg.pairs is None):
        raise InputError("pair/pairs", "give exactly one of pair=[fixed,moving] or pairs=LIST")
    if cfg.pairs is not None:
        if cfg.labels is not None or cfg.landmarks is not None:
            raise InputError("labels/landmarks", "with pairs=LIST give them as list columns")
        return [(spec, out / spec.name) for spec in pairs_from_list(cfg.pairs)]
    fixed, moving = as_pair(cfg.pair, "pair")
    labels = as_pair(cfg.labels, "labels")
    landmarks = as_pair(cfg.landmarks, "landmarks")
    spec = PairSpec(
        "pair",
        Path(fixed),
        Path(moving),
        None if labels is None else (Path(labels[0]), Path(labels[1])),
        None if landmarks is None else (Path(landmarks[0]), Path(landmarks[1])),
    )
    return [(spec, out)]


def apply_preprocess_overrides(network: Network, cfg: DictConfig) -> Network:
    """Replace the checkpoint's spacing/shape by ``preprocess.spacing``/``shape`` when set (one
    value per axis of the network, 2 or 3; a single number for every axis)."""
    overrides = {}
    ndim = network.preprocessing.ndim
    for key in ("spacing", "shape"):
        value = cfg.preprocess.get(key)
        if value is not None:
            values = OmegaConf.to_container(value) if OmegaConf.is_config(value) else [value] * ndim
            if len(values) != ndim:
                raise InputError(f"preprocess.{key}", f"needs {ndim} values, got {values}")
            cast = float if key == "spacing" else int
            overrides[key] = tuple(cast(v) for v in values)
    if overrides:
        network.preprocessing = replace(network.preprocessing, **overrides)
    return network


def header_matrix(item: dict) -> torch.Tensor:
    """The scanner headers' alignment ``(1, ndim+1, ndim+1)`` float64, fixed network-grid voxel
    -> moving network-grid voxel: fixed voxel ``x`` is world point ``A_f x``, which the moving
    grid holds at voxel ``A_m^-1 A_f x``."""
    fixed_affine = torch.as_tensor(item["fixed_affine"], dtype=torch.float64)
    moving_affine = torch.as_tensor(item["moving_affine"], dtype=torch.float64)
    matrix = torch.linalg.solve(moving_affine, fixed_affine)
    if item["fixed"].dim() == 3:  # a 2D grid lies in the plane z = 0 of its 4x4 affine
        matrix = matrix[[0, 1, 3]][:, [0, 1, 3]]
    return matrix[None]


def header_ddf(item: dict, device: torch.device) -> torch.Tensor:
    """The scanner headers' alignment (:func:`header_matrix`) as a DDF ``(1, ndim, *S)`` in
    voxels of the fixed network grid (backward)."""
    shape = tuple(item["fixed"].shape[1:])
    return affine_to_ddf(header_matrix(item), shape).float().to(device)


def wants_affine_start(network: Network, setting: object) -> bool:
    """``affine_start=`` ``setting`` (checked by :func:`check_refine_settings`): ``true`` or
    ``false``, or ``auto``: the checkpoint's own ``predict.affine_start`` (networks trained on
    affinely aligned pairs record it; :mod:`regnet.bundled`), else false."""
    if setting == "auto":
        return bool((network.config.get("predict") or {}).get("affine_start", False))
    return bool(setting)


def affine_start(
    fixed: torch.Tensor, moving: torch.Tensor, item: dict, device: torch.device
) -> torch.Tensor:
    """``register.py``'s affine alignment of the preprocessed pair, fixed network-grid voxel ->
    moving network-grid voxel ``(1, ndim+1, ndim+1)``.

    The moving image is put on the fixed network grid through the headers, and
    :func:`regnet.optimize.register` runs ``transform=affine`` there with the start search,
    similarity, overlap region and iterations of ``configs/register.yaml``'s affine stage
    (``affine_model``, ``affine_loss``, ``init``, ``search_iterations``, ``overlap_margin``,
    ``affine_sampling``, ``levels``; the finest level skipped, as there); the result is composed
    with the headers' matrix."""
    settings = compose_config("register", [])
    header = header_matrix(item).to(device)
    shape = tuple(fixed.shape[2:])
    on_fixed_grid = warp(moving, affine_to_ddf(header, shape).float())
    spacing = np.linalg.norm(np.asarray(item["fixed_affine"])[:3, : len(shape)], axis=0)
    result = register(
        fixed,
        on_fixed_grid,
        transform=str(settings.affine_model),
        loss=str(settings.affine_loss),
        iterations=prestage_iterations(str(settings.affine_model), int(settings.levels)),
        init=str(settings.init),
        search_iterations=int(settings.search_iterations),
        overlap_margin=float(settings.overlap_margin),
        affine_sampling=bool(settings.affine_sampling),
        spacing=[float(s) for s in spacing],
        device=device,
    )
    return header @ result.matrix.double()


def after_affine(matrix: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """The DDF ``(1, ndim, *S)`` (voxels of the fixed grid, backward, tensor axis order) of
    ``ddf`` (fixed grid -> the affinely aligned moving image) followed by ``matrix`` (fixed voxel
    -> moving voxel): ``x -> A (x + ddf(x)) + t - x``, exact for the affine part (not
    resampled)."""
    grid = identity_grid(ddf.shape[2:], ddf.device, torch.float64)
    mapped = apply_affine(matrix.to(ddf.device), grid + ddf.double())
    return (mapped - grid).float()


def predict_pair(
    network: Network, inputs: PairInputs, device: torch.device, cfg: DictConfig
) -> RegistrationResult:
    """Register one pair with the network (and ``refine.steps`` of instance optimisation).

    With an affine start (:func:`wants_affine_start`) the network sees the moving image after
    :func:`affine_start` and its field is composed with that affine. With ``start_check`` the
    candidates header -> (affine ->) network -> refined are judged by
    :mod:`regnet.optimize.safeguard` and the last one not worse than those before it is kept
    (a one-line warning when that is not the last). ``seconds`` covers preprocessing, the
    network, refinement, the check and the conversion to mm."""
    watch = Stopwatch(device)
    item = network.preprocessing.apply(inputs)
    fixed, moving = item["fixed"][None].to(device), item["moving"][None].to(device)
    candidates = {"header": header_ddf(item, device)}
    if wants_affine_start(network, cfg.affine_start):
        matrix = affine_start(fixed, moving, item, device)
        candidates["affine"] = affine_to_ddf(matrix, fixed.shape[2:]).float()
        aligned = warp(moving, candidates["affine"])
        ddf = run_network(
            network, {"fixed": item["fixed"], "moving": aligned[0]}, device, bool(cfg.bf16)
        )
        ddf = after_affine(matrix, ddf)
    else:
        ddf = run_network(network, item, device, bool(cfg.bf16))
    candidates["network"] = ddf
    steps = int(cfg.refine.steps)
    if steps > 0:
        candidates["refined"] = refine(
            ddf,
            fixed,
            moving,
            steps=steps,
            loss=str(cfg.refine.loss),
            weights=OmegaConf.to_container(cfg.refine.weights),
            lr=None if cfg.refine.lr is None else float(cfg.refine.lr),
            transform=str(cfg.refine.transform),
            levels=int(cfg.refine.levels),
            window=int(cfg.refine.window),
            smoothing=float(cfg.refine.smoothing),
        )
    check = None
    if cfg.start_check:
        check = check_against_start(fixed, moving, candidates, region=foreground_mask(fixed))
        if not check.result_kept:
            print(f"warning: {inputs.moving.path}: {check.message()}", file=sys.stderr)
        ddf = candidates[check.kept]
    else:
        ddf = list(candidates.values())[-1]
    field = network_field_to_world(ddf, item["fixed_affine"], item["moving_affine"])
    seconds = watch.seconds()
    return complete_registration(
        inputs,
        field,
        seconds,
        method=f"ckpt:{network.path}",
        checkpoint_version=network.version,
        preprocessing={
            "spacing": network.preprocessing.spacing,
            "shape": network.preprocessing.shape,
            "percentiles": network.preprocessing.percentiles,
        },
        refine_steps=steps,
        device=str(device),
        **({} if check is None else {"start_check": check.as_dict()}),
    )


def check_refine_settings(cfg: DictConfig) -> None:
    """Reject bad ``refine.*`` and ``affine_start`` settings before anything runs
    (:class:`InputError`)."""
    if int(cfg.refine.steps) < 0:
        raise InputError("refine.steps", f"must be >= 0, got {cfg.refine.steps}")
    if cfg.refine.transform not in REFINE_TRANSFORMS:
        choices = " or ".join(REFINE_TRANSFORMS)
        raise InputError("refine.transform", f"must be {choices}, got {cfg.refine.transform}")
    if cfg.get("affine_start", "auto") not in ("auto", True, False):
        raise InputError("affine_start", f"must be auto, true or false, got {cfg.affine_start}")
    if int(cfg.refine.levels) < 1:
        raise InputError("refine.levels", f"must be >= 1, got {cfg.refine.levels}")


def predict(cfg: DictConfig) -> list[Path]:
    """Run ``predict`` for a composed ``configs/predict.yaml``; returns the output folders (with
    ``submission=DIR`` only that folder: per-pair folders are not written then; with a list,
    ``out``: :func:`predict_list`).

    For ``pair=`` and ``submission=`` runs every input file and output folder is checked before
    the network runs; each pair's outputs are staged and appear complete or not at all.
    """
    if OmegaConf.is_missing(cfg, "ckpt") or cfg.ckpt is None:
        raise InputError(
            "ckpt", "missing; pass ckpt=PATH to a checkpoint written by regnet-train, or ckpt=brain"
        )
    check_refine_settings(cfg)
    device = resolve_device(cfg.device)
    jobs = pair_specs(cfg)
    if cfg.pair is None and cfg.submission is None:
        return [predict_list(cfg, [spec for spec, _ in jobs], device)]
    for spec, out_dir in jobs:
        spec.check_files()
        if cfg.submission is None:
            check_output_dir(out_dir, bool(cfg.overwrite))
    if cfg.submission is not None:
        check_submission(cfg, [spec for spec, _ in jobs])
    network = apply_preprocess_overrides(load_network(cfg.ckpt, device), cfg)
    for spec, _ in jobs:
        network.check_images(spec.fixed, spec.moving)
    written = []
    with submission_folder(cfg) as submission:
        for spec, out_dir in jobs:
            inputs = spec.load()
            result = predict_pair(network, inputs, device, cfg)
            if submission is not None:
                path = write_submission_field(submission, inputs, result)
                print(f"{Path(cfg.submission) / path.name}: {summary_line(result.metrics)}")
                continue
            write_registration(out_dir, inputs, result, bool(cfg.overwrite), bool(cfg.overview))
            print(f"{out_dir}: {summary_line(result.metrics)}")
            written.append(out_dir)
    return written if submission is None else [Path(cfg.submission)]


def predict_list(cfg: DictConfig, specs: list[PairSpec], device: torch.device) -> Path:
    """The pairs of ``pairs=``/``learn2reg=`` through :mod:`regnet.cli.cohort` (ranks,
    resume, ``summary.csv``); returns ``out``. The checkpoint is read here first, so that a bad
    one stops the run before any pair."""
    from regnet.cli.cohort import run_pair_folders  # Lightning is imported for lists only

    @functools.cache
    def network_on(rank_device: torch.device) -> Network:
        return apply_preprocess_overrides(load_network(cfg.ckpt, rank_device), cfg)

    network_on(device)

    def run(inputs: PairInputs, rank_device: torch.device) -> RegistrationResult:
        network = network_on(rank_device)
        network.check_images(inputs.fixed.path, inputs.moving.path)
        return predict_pair(network, inputs, rank_device, cfg)

    return run_pair_folders(cfg, specs, f"ckpt:{cfg.ckpt}", run, summary_line)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: ``regnet-predict [key=value ...]`` (Hydra override syntax); from the
    command line a single pair's run ends the process when done
    (:func:`regnet.cli.common.run_pair_command`)."""
    run_pair_command("predict", predict, argv)


if __name__ == "__main__":
    main()
