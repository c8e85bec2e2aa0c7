"""``configs/register.yaml`` as the engine's arguments: :func:`engine_settings` turns a composed
config into the keyword arguments of :func:`regnet.optimize.register` for one working grid
(:mod:`regnet.cli.working_grid`), and :func:`check_settings` rejects bad values with one line
naming the setting."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from regnet.cli.common import InputError
from regnet.cli.working_grid import FWHM_PER_SIGMA, INTERPOLATIONS
from regnet.optimize import INITS, TRANSFORMS
from regnet.optimize.contrast import AUTO


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
(:func:`regnet.cli.working_grid.on_grid`). On the real-scan benchmark at 2 mm
(``docs/benchmarks.md``, "Real scans"), where the scans' own grid is the working grid and
nothing blurs them, 0.3 voxels lowered the end-point error in 7 of 9 scenarios for both draws
(with a rotated header 0.335 -> 0.288 mm), raising it with T2-like contrast (by 0.008-0.017 mm)
and on the combined pair; 1 mm scans on the 1.5 mm grid already carry 0.32 voxels of
anti-aliasing, and 0.3 more changed little there."""


def mind_sigma(
    setting: Any, grid_spacing: Sequence[float], image_spacing: Sequence[float]
) -> tuple[float, ...]:
    """Per working-grid axis, the Gaussian sigma (voxels) applied to both images before their
    MIND-SSC descriptors for ``mind_sigma=`` ``setting``: a number (every axis), or ``"auto"``:
    what takes the fixed image's blur to :data:`MIND_BLUR` in quadrature, its blur being the
    anti-aliasing of ``image_spacing`` mm onto ``grid_spacing`` mm
    (:func:`regnet.cli.working_grid.on_grid`)."""
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
