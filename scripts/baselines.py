"""Classical registration on the demo validation pairs: none, ANTs affine/SyN, regnet's engine.

Each validation pair of a Learn2Reg-layout folder (default ``data/demo/3d_2mm``, written by
``scripts/prepare_demo.py``) is preprocessed exactly as the networks see it
(:class:`regnet.data.Learn2RegDataset`: RAS, ``--spacing`` mm, ``--shape`` voxels, [0, 1]
intensities) and registered on that grid (origin 0, identity direction, the network spacing, so
every result is a field on the fixed network grid like a network's) by:

- ANTs: ``affine``; ``syn`` (affine then SyN with ``--syn-iterations``); ``syn-default``
  (antspyx's own ``SyN`` defaults, iterations 40,20,0);
- regnet's per-pair optimisation, ``regnet-<transform>``: :func:`regnet.optimize.register` with
  the defaults of ``register.py``, including its working grid (``--regnet-spacing`` mm, 2 by
  default; the field is upsampled to the data grid); ``regnet-<transform>:100-60-30`` sets the
  iterations per level, coarse to fine, and ``regnet-<transform>:LABEL`` the ``register.yaml``
  overrides of ``--variant LABEL=KEY=VALUE[ KEY=VALUE]``, so that settings can be compared in
  one run;
- with ``--checkpoint``, a trained network: ``regnet-net`` (one forward pass on the CPU) and
  ``regnet-net+refine`` (then :func:`regnet.optimize.refine` with its defaults, a diffeomorphic
  update on 2 levels, ``--refine-steps`` per level, as ``predict.py refine.steps=N`` does) and
  ``regnet-net+refine-ddf`` (the same with an additive update, ``refine.transform=ddf``).

The moving labels are warped (ANTs: ``genericLabel``; regnet: nearest neighbour) and scored
against the fixed labels with :mod:`regnet.metrics`: mean Dice over the fixed image's labels,
mean HD95 (mm), % of voxels with ``det J <= 0`` and SDlogJ of the displacement field, and
seconds per pair (registration only), all methods timed in one run on identical inputs.

ANTs methods need antspyx (optional ``baselines`` extra: ``pip install 'regnet[baselines]'``).

Usage: ``python scripts/baselines.py [--data data/demo/3d_2mm] [--methods none,affine,syn]
[--checkpoint best.ckpt] [--pairs 0,1] [--csv results.csv] [--threads 2]``
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from regnet.cli.common import compose_config
from regnet.cli.register_settings import engine_settings
from regnet.data.layouts import Learn2RegDataset
from regnet.metrics import dice_per_label, hd95, jacobian_stats
from regnet.optimize import refine
from regnet.optimize import register as regnet_register
from regnet.optimize.pyramid import downsample
from regnet.pipeline import load_network, run_network
from regnet.spatial import resize_ddf, warp_labels

ANTS_TRANSFORMS = {"affine": "Affine", "syn": "SyN", "syn-default": "SyN"}
REGNET_TRANSFORMS = {"regnet-affine": "affine", "regnet-bspline": "bspline", "regnet-svf": "svf"}
NETWORK_METHODS = {"regnet-net": None, "regnet-net+refine": "svf", "regnet-net+refine-ddf": "ddf"}
"""Network methods and the transform of their refinement (``None``: the network alone)."""


def import_ants():
    """antspyx, imported only when an ANTs method is requested."""
    try:
        import ants
    except ImportError as error:
        raise SystemExit(
            "scripts/baselines.py: ANTs methods need antspyx; install it with "
            "pip install 'regnet[baselines]' (or run with --methods none)"
        ) from error
    return ants


def ants_image(ants, array: np.ndarray, spacing: tuple[float, ...]):
    """An ANTs image of a network-grid array: origin 0, identity direction, ``spacing`` mm."""
    return ants.from_numpy(np.ascontiguousarray(array, dtype=np.float32), spacing=spacing)


def register(
    ants, method: str, item: dict, spacing: tuple[float, ...], syn_iterations: tuple[int, ...]
):
    """Run one ANTs registration; returns ``(warped_moving_label, ddf_voxels, seconds)``.

    ``ddf_voxels`` is ``(ndim, *S)`` on the fixed grid, backward (fixed voxel ``x`` -> moving
    voxel ``x + u(x)``), components in array axis order, as in :mod:`regnet.spatial`.
    """
    fixed = ants_image(ants, item["fixed"][0].numpy(), spacing)
    moving = ants_image(ants, item["moving"][0].numpy(), spacing)
    start = time.perf_counter()
    options = {"reg_iterations": syn_iterations} if method == "syn" else {}  # else antspyx's
    result = ants.registration(fixed, moving, type_of_transform=ANTS_TRANSFORMS[method], **options)
    seconds = time.perf_counter() - start
    moving_label = ants_image(ants, item["moving_label"][0].numpy(), spacing)
    warped = ants.apply_transforms(
        fixed, moving_label, result["fwdtransforms"], interpolator="genericLabel"
    ).numpy()
    with tempfile.TemporaryDirectory() as folder:
        field_path = ants.apply_transforms(
            fixed, moving, result["fwdtransforms"], compose=os.path.join(folder, "field_")
        )
        field = np.asarray(nib.load(field_path).dataobj, np.float64)
    # ITK displacement (mm, along the array axes here) of shape (*S, [1,] ndim) -> voxels
    field = field.reshape(*fixed.shape, len(spacing))
    ddf = np.moveaxis(field, -1, 0) / np.asarray(spacing).reshape(-1, *[1] * len(spacing))
    return np.rint(warped).astype(np.int64), ddf, seconds


def working_shape(shape, spacing, working_spacing) -> tuple[int, ...]:
    """Grid over the same extent as ``shape`` at about ``working_spacing`` mm (never finer)."""
    return tuple(
        max(2, min(n, round((n - 1) * s / working_spacing) + 1))
        for n, s in zip(shape, spacing, strict=True)
    )


def split_iterations(method: str) -> tuple[str, tuple[int, ...] | None]:
    """``"regnet-svf:100-60-30"`` -> ``("regnet-svf", (100, 60, 30))``; no suffix, or a
    ``--variant`` label as suffix -> ``None``."""
    name, _, suffix = method.partition(":")
    if not suffix or not suffix.replace("-", "").isdigit():
        return name, None
    return name, tuple(int(n) for n in suffix.split("-"))


def variant_overrides(method: str, variants: dict[str, list[str]]) -> list[str]:
    """``configs/register.yaml`` overrides of ``"regnet-svf:LABEL"`` (``--variant``)."""
    suffix = method.partition(":")[2]
    return variants.get(suffix, [])


def register_regnet(
    transform: str,
    item: dict,
    spacing: tuple[float, ...],
    working_spacing: float | None,
    iterations: tuple[int, ...] | None = None,
    overrides: list[str] | None = None,
):
    """regnet's classical optimisation (the engine settings of ``configs/register.yaml`` with
    ``overrides``, ``iterations`` per level if given) on the same pair; returns
    ``(warped_moving_label, ddf_voxels, seconds)`` like :func:`register`.

    As ``register.py`` does, it runs on a grid of ``working_spacing`` mm covering the pair's
    extent (``None``: the pair's own grid) and the field is upsampled to the pair's grid."""
    start = time.perf_counter()
    fixed, moving = item["fixed"][None], item["moving"][None]
    shape = tuple(fixed.shape[2:])
    grid = shape if working_spacing is None else working_shape(shape, spacing, working_spacing)
    grid_spacing = [s * (n - 1) / (m - 1) for s, n, m in zip(spacing, shape, grid, strict=True)]
    config = compose_config("register", [f"transform={transform}", *(overrides or [])])
    settings = engine_settings(config, grid_spacing, spacing)
    if iterations is not None:
        settings["iterations"] = iterations
    result = regnet_register(downsample(fixed, grid), downsample(moving, grid), **settings)
    ddf = resize_ddf(result.ddf, shape)
    seconds = time.perf_counter() - start
    warped = warp_labels(item["moving_label"][None], ddf, method="nearest")
    return warped[0, 0].numpy(), ddf[0].double().numpy(), seconds


def register_network(network, item: dict, refine_transform: str | None, refine_steps: int):
    """A trained network's field for the pair (one forward pass on the CPU), then, unless
    ``refine_transform`` is ``None``, ``refine_steps`` per level of instance optimisation;
    returns like :func:`register`."""
    start = time.perf_counter()
    ddf = run_network(network, item, "cpu")
    if refine_transform is not None:
        ddf = refine(
            ddf,
            item["fixed"][None],
            item["moving"][None],
            steps=refine_steps,
            transform=refine_transform,
        )
    seconds = time.perf_counter() - start
    warped = warp_labels(item["moving_label"][None], ddf, method="nearest")
    return warped[0, 0].numpy(), ddf[0].double().numpy(), seconds


def score(item: dict, warped_label: np.ndarray, ddf: np.ndarray | None, spacing) -> dict:
    """Mean Dice and HD95 over the fixed image's labels; folding and SDlogJ of ``ddf``."""
    fixed_label = item["fixed_label"][0].numpy()
    labels = [int(k) for k in np.unique(fixed_label) if k > 0]
    dice = dice_per_label(warped_label, fixed_label, labels)
    distances = [d for d in hd95(warped_label, fixed_label, spacing, labels).values()]
    row = {
        "dice": float(np.mean(list(dice.values()))),
        "hd95_mm": float(np.mean([d for d in distances if np.isfinite(d)])),
        "folding_percent": 0.0,
        "sdlogj": 0.0,
    }
    if ddf is not None:
        row.update(jacobian_stats(ddf))
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo/3d_2mm"))
    parser.add_argument("--spacing", type=float, nargs="+", default=[2.0, 2.0, 2.0])
    parser.add_argument("--shape", type=int, nargs="+", default=[96, 112, 96])
    parser.add_argument("--methods", default="none,affine,syn")
    parser.add_argument("--pairs", default=None, help="validation pair indices, e.g. 0,1")
    parser.add_argument(
        "--centre",
        choices=["grid", "foreground"],
        default="grid",
        help="crop/pad about the grid or the foreground centre (as the network was trained)",
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="for regnet-net methods")
    parser.add_argument(
        "--refine-steps",
        type=int,
        default=10,
        help="per pyramid level (refine defaults: svf, 2 levels)",
    )
    parser.add_argument(
        "--regnet-spacing",
        default="2",
        help="working grid (mm) of regnet-<transform> methods, as register.py spacing=; none "
        "keeps the data grid",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="LABEL=KEY=VALUE[ KEY=VALUE]: method regnet-<transform>:LABEL runs with these "
        "configs/register.yaml overrides (repeatable)",
    )
    parser.add_argument("--csv", type=Path, default=None, help="per-pair results")
    parser.add_argument("--threads", type=int, default=None, help="ITK and torch threads")
    parser.add_argument(
        "--syn-iterations",
        default="40,20,10",
        help="SyN iterations per level, coarse to fine (antspyx default 40,20,0 skips the finest)",
    )
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    variants = {}
    for text in args.variant:
        label, _, overrides = text.partition("=")
        variants[label] = overrides.split()
    valid = {"none", *ANTS_TRANSFORMS, *REGNET_TRANSFORMS, *NETWORK_METHODS}
    unknown = {m for m in methods if split_iterations(m)[0] not in valid}
    unknown |= {m for m in methods if ":" in m and split_iterations(m)[0] not in REGNET_TRANSFORMS}
    unknown |= {
        m
        for m in methods
        if ":" in m and not split_iterations(m)[1] and not variant_overrides(m, variants)
    }
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {sorted(valid)}")
    network = None
    if set(methods) & set(NETWORK_METHODS):
        if args.checkpoint is None:
            parser.error(f"--methods {','.join(NETWORK_METHODS)} need --checkpoint")
        network = load_network(args.checkpoint)
    working_spacing = None if args.regnet_spacing == "none" else float(args.regnet_spacing)
    if args.threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    ants = import_ants() if set(methods) & set(ANTS_TRANSFORMS) else None
    dataset_json = args.data / "dataset.json"
    if not dataset_json.is_file():
        raise SystemExit(f"{dataset_json}: not found; run python scripts/prepare_demo.py first")
    syn_iterations = tuple(int(n) for n in args.syn_iterations.split(","))
    ndim = len(args.shape)
    spacing = tuple(float(s) for s in args.spacing)
    pairs = Learn2RegDataset(
        dataset_json,
        split="val",
        ndim=ndim,
        spacing=spacing,
        shape=args.shape,
        centre=args.centre,
    )
    indices = range(len(pairs))
    if args.pairs:
        indices = [int(i) for i in args.pairs.split(",")]
    rows = []
    for index in indices:
        item = pairs[index]
        for method in methods:
            if method == "none":
                warped, ddf, seconds = item["moving_label"][0].numpy(), None, 0.0
            elif split_iterations(method)[0] in REGNET_TRANSFORMS:
                name, iterations = split_iterations(method)
                warped, ddf, seconds = register_regnet(
                    REGNET_TRANSFORMS[name],
                    item,
                    spacing,
                    working_spacing,
                    iterations,
                    variant_overrides(method, variants),
                )
            elif method in NETWORK_METHODS:
                warped, ddf, seconds = register_network(
                    network, item, NETWORK_METHODS[method], args.refine_steps
                )
            else:
                warped, ddf, seconds = register(ants, method, item, spacing, syn_iterations)
            row = {
                "method": method,
                "fixed": Path(item["fixed_path"]).name,
                "moving": Path(item["moving_path"]).name,
                **score(item, warped, ddf, spacing),
                "seconds": seconds,
            }
            rows.append(row)
            print(
                f"{method:17s} {row['fixed']} <- {row['moving']}: Dice {row['dice']:.3f}  "
                f"HD95 {row['hd95_mm']:.2f} mm  folding {row['folding_percent']:.3f} %  "
                f"{seconds:.1f} s"
            )
    print(f"\n{'method':17s}  Dice            HD95 (mm)      folding (%)   SDlogJ   s/pair")
    for method in methods:
        chosen = [r for r in rows if r["method"] == method]
        mean = {
            k: np.mean([r[k] for r in chosen])
            for k in chosen[0]
            if k not in ("method", "fixed", "moving")
        }
        std = np.std([r["dice"] for r in chosen])
        print(
            f"{method:17s}  {mean['dice']:.3f} ± {std:.3f}   {mean['hd95_mm']:6.2f}"
            f"         {mean['folding_percent']:7.3f}      {mean['sdlogj']:.3f}   "
            f"{mean['seconds']:.1f}"
        )
    if args.csv is not None:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
