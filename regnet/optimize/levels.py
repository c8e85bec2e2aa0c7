"""One pyramid level of a registration: its images, masks and loss, the objective evaluated
on it, and the Adam loop that minimises it.

Conventions (:mod:`regnet.spatial`): images ``(1, C, *S)`` on the level's grid; matrices map
full-resolution fixed voxels to moving voxels (backward); a deformable displacement ``local``
holds voxels of the level.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from regnet.losses import build_loss
from regnet.spatial import apply_affine, identity_grid, sample

SIMILARITY_WINDOW_TERMS = ("lncc",)
"""Loss terms whose ``window`` option :func:`register` sets per level from ``windows``."""


@dataclass
class LevelHistory:
    """Loss (total, one value per iteration) of one stage on one pyramid level."""

    stage: str
    level: int
    shape: tuple[int, ...]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Level:
    """Images, masks and loss of one pyramid level."""

    index: int
    shape: tuple[int, ...]
    step: tuple[float, ...]
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_mask: torch.Tensor | None
    moving_mask: torch.Tensor | None
    loss: Any
    affine_loss: Any
    sampled: Any = None
    """Deformable stage: a :class:`regnet.optimize.sampled.SampledMIND` taking the place of the
    ``mind`` term, ``loss`` then holding the remaining (field-only) terms, or ``None``."""
    sampled_weight: float = 1.0
    dense_loss: Any = None
    """With ``sampled``: the deformable loss with its dense ``mind`` term."""
    affine_sampled: Any = None
    """Affine stage: a :class:`regnet.optimize.sampled.SampledPooled` evaluating
    ``affine_loss`` at lattice voxels, or ``None`` (every voxel)."""

    def level_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """A full-resolution voxel matrix expressed in this level's voxels: ``D⁻¹ M D``."""
        d = torch.tensor([*self.step, 1.0], device=matrix.device, dtype=matrix.dtype)
        return matrix * d.view(1, 1, -1) / d.view(1, -1, 1)


def landmark_error(
    level: Level,
    matrix: torch.Tensor | None,
    local: torch.Tensor | None,
    fixed_points: torch.Tensor,
    moving_points: torch.Tensor,
    spacing: torch.Tensor | None,
) -> torch.Tensor:
    """Mean squared distance between mapped fixed landmarks ``T(x_f)`` and moving landmarks.

    Points are ``(N, ndim)`` full-resolution voxels; the distance is in voxels, or mm when
    ``spacing`` (mm per voxel, ``(ndim,)``) is given.
    """
    points = fixed_points
    ndim = points.shape[1]
    step = torch.tensor(level.step, device=points.device, dtype=points.dtype)
    if local is not None:
        coords = (points / step).T.reshape(1, ndim, -1, *([1] * (ndim - 1)))
        displacement = sample(local, coords, padding="border").reshape(ndim, -1).T
        points = points + displacement * step
    if matrix is not None:
        points = points @ matrix[0, :ndim, :ndim].T + matrix[0, :ndim, ndim]
    difference = points - moving_points
    if spacing is not None:
        difference = difference * spacing
    return (difference**2).sum(1).mean()


def level_objective(
    level: Level,
    matrix: torch.Tensor | None,
    local: torch.Tensor | None,
    landmarks: tuple[torch.Tensor, torch.Tensor] | None,
    landmark_weight: float,
    spacing: torch.Tensor | None,
) -> torch.Tensor:
    """Total loss of one evaluation: the image loss on the warped moving image of the level plus
    the weighted landmark term; ``local`` is the deformable displacement in level voxels (the
    deformable stage's ``level.loss``, or ``level.sampled`` and the field terms in
    ``level.loss``), ``None`` during the affine stage (``level.affine_loss``)."""
    total = torch.zeros((), device=level.fixed.device)
    loss = level.affine_loss if local is None else level.loss
    if local is None and level.affine_sampled is not None and matrix is not None:
        total = total + level.affine_sampled(level.level_matrix(matrix))
    elif local is not None and level.sampled is not None:
        total = total + level.sampled_weight * level.sampled(local)
        if loss is not None:
            total = total + loss({"ddf": local})[0]
    elif loss is not None:
        grid = identity_grid(level.shape, level.fixed.device, level.fixed.dtype)
        points = grid if local is None else grid + local
        if matrix is not None:
            points = apply_affine(level.level_matrix(matrix), points)
        warped = sample(level.moving, points, padding="border")
        ddf = local if local is not None else torch.zeros_like(grid)
        inputs = {"fixed": level.fixed, "moving": level.moving, "warped": warped, "ddf": ddf}
        mask = level.fixed_mask
        if level.moving_mask is not None:
            warped_mask = sample(level.moving_mask, points.detach(), padding="zeros")
            mask = warped_mask if mask is None else mask * warped_mask
        if mask is not None:
            inputs["fixed_mask"] = mask
        total = total + loss(inputs)[0]
    if landmarks is not None:
        error = landmark_error(level, matrix, local, *landmarks, spacing)
        total = total + landmark_weight * error
    return total


def run_adam(
    parameters: Sequence[torch.nn.Parameter],
    evaluate,
    iterations: int,
    lr: float,
    history: LevelHistory,
) -> None:
    """Adam for ``iterations`` steps on ``evaluate()``; the learning rate decays linearly to a
    tenth so the last steps settle to well below ``lr``."""
    start = time.perf_counter()
    optimiser = Adam(parameters)
    for index in range(iterations):
        for parameter in parameters:
            parameter.grad = None
        loss = evaluate()
        loss.backward()
        fraction = index / max(iterations, 1)
        optimiser.step(lr * (1.0 - 0.9 * fraction))
        history.losses.append(float(loss.detach()))
    history.seconds = time.perf_counter() - start


class Adam:
    """Adam (Kingma and Ba) with ``torch.optim.Adam``'s defaults and arithmetic (betas 0.9,
    0.999; eps 1e-8), the learning rate given per step.

    Own code because constructing ``torch.optim.Adam`` imports ``torch._dynamo`` on first use:
    0.85 s of every ``register.py`` command on 2 CPU threads, about an eighth of registering a
    2 mm brain pair. The updates equal ``torch.optim.Adam``'s (tested).
    """

    betas = (0.9, 0.999)
    eps = 1e-8

    def __init__(self, parameters: Sequence[torch.Tensor]) -> None:
        self.parameters = list(parameters)
        self.first = [torch.zeros_like(p) for p in self.parameters]
        self.second = [torch.zeros_like(p) for p in self.parameters]
        self.steps = 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One update of every parameter that has a gradient."""
        self.steps += 1
        beta1, beta2 = self.betas
        correction1 = 1.0 - beta1**self.steps
        correction2_sqrt = (1.0 - beta2**self.steps) ** 0.5
        for parameter, first, second in zip(self.parameters, self.first, self.second, strict=True):
            if parameter.grad is None:
                continue
            grad = parameter.grad
            first.lerp_(grad, 1.0 - beta1)
            second.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denominator = (second.sqrt() / correction2_sqrt).add_(self.eps)
            parameter.addcdiv_(first, denominator, value=-lr / correction1)


def terms_of(spec: str, values: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The entries of a per-term mapping (weights, options) for the terms of ``spec``."""
    if values is None:
        return None
    names = set(spec.replace(" ", "").split("+"))
    return {name: value for name, value in values.items() if name in names}


def level_loss(
    loss: str | None,
    weights: Mapping[str, float] | None,
    options: Mapping[str, Mapping[str, Any]] | None,
    window: int,
):
    """The :func:`build_loss` composite for one level, similarity windows set to ``window``."""
    if not loss:
        return None
    level_options = {name: dict(value) for name, value in (options or {}).items()}
    for name in loss.replace(" ", "").split("+"):
        if name in SIMILARITY_WINDOW_TERMS:
            level_options.setdefault(name, {})["window"] = int(window)
    composite = build_loss(loss, weights=weights, options=level_options or None)
    composite.check({"fixed", "moving", "warped", "ddf", "fixed_mask"})
    return composite
