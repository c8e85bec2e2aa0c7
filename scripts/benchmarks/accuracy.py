"""Accuracy at an equal training budget: regnet's default model against VoxelMorph 0.3.4.

Both networks are trained by the same plain loop: the same synthetic 2D pairs in the same order
(:class:`regnet.data.SyntheticPairs`, mono-modal by default), the same regnet loss applied to the
moving image warped by each model's field with :func:`regnet.spatial.warp`, the same Adam
optimiser, learning rate, batch size and number of steps, and the same seed. ``VxmPairwise``'s
output is its integrated displacement, which already follows regnet's DDF convention (see
:class:`benchmarks.models.DDFModel`).

Validation on held-out pairs (another seed): Dice of the fixed labels against the moving labels
warped with nearest-neighbour sampling (mean over the labels present in either map, then over
pairs; MONAI's ``compute_dice``), the same Dice without registration (identity), and the
percentage of voxels with ``det(I + grad u) <= 0`` (folding).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from benchmarks.models import MODELS, build_benchmark_model
from monai.metrics import compute_dice

from regnet.data import SyntheticPairs
from regnet.losses import build_loss
from regnet.nets import count_parameters
from regnet.spatial import jacobian_determinant, warp, warp_labels

NUM_LABELS = 12
VAL_SEED_OFFSET = 1_000_003  # validation pairs come from seed + this offset
# VoxelMorph's regularisation weight for MSE on [0, 1] intensities; regnet's default otherwise
VXM_MSE_WEIGHTS = {"grad": 0.01}


@dataclass(frozen=True)
class AccuracyConfig:
    """One equal-budget comparison.

    Args:
        shape: 2D image size.
        steps: optimiser steps per model.
        batch_size: pairs per step.
        loss: regnet loss spec (``regnet.losses.build_loss``).
        weights: loss weights; ``None``: regnet's defaults, with ``grad`` 0.01 for ``mse+grad``.
        lr: Adam learning rate.
        seed: seeds the networks' initialisation and the training pairs.
        val_pairs: number of held-out validation pairs.
        same_contrast: mono-modal pairs (one intensity per label shared by both images).
        models: keys of :data:`benchmarks.models.MODELS`.
        device: torch device.
    """

    shape: tuple[int, ...] = (96, 96)
    steps: int = 1500
    batch_size: int = 4
    loss: str = "lncc+grad"
    weights: dict[str, float] | None = None
    lr: float = 1e-3
    seed: int = 0
    val_pairs: int = 64
    same_contrast: bool = True
    models: tuple[str, ...] = ("voxelmorph", "vxm")
    device: str = "cpu"

    def loss_weights(self) -> dict[str, float] | None:
        if self.weights is not None:
            return self.weights
        return VXM_MSE_WEIGHTS if self.loss == "mse+grad" else None

    def describe(self) -> str:
        weights = self.loss_weights() or "default weights"
        contrast = "mono-modal" if self.same_contrast else "random contrast per image"
        return (
            f"synthetic 2D {'x'.join(map(str, self.shape))} pairs ({contrast}, {NUM_LABELS} "
            f"labels), {self.steps} steps x batch {self.batch_size}, loss {self.loss} "
            f"({weights}), Adam lr {self.lr:g}, seed {self.seed}, {self.val_pairs} validation pairs"
        )


def _batch(dataset: SyntheticPairs, indices: Sequence[int], device: torch.device) -> dict:
    items = [dataset[i] for i in indices]
    return {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}


def train(
    model: torch.nn.Module,
    config: AccuracyConfig,
    log: Callable[[str], None] = print,
    name: str = "",
) -> float:
    """Train ``model`` (``forward(fixed, moving) -> ddf``) for ``config.steps``; returns seconds."""
    device = torch.device(config.device)
    data = SyntheticPairs(
        config.shape,
        num_labels=NUM_LABELS,
        length=config.steps * config.batch_size,
        seed=config.seed,
        same_contrast=config.same_contrast,
    )
    loss = build_loss(config.loss, config.loss_weights()).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    start = time.perf_counter()
    for step in range(config.steps):
        batch = _batch(
            data, range(step * config.batch_size, (step + 1) * config.batch_size), device
        )
        ddf = model(batch["fixed"], batch["moving"])
        warped = warp(batch["moving"], ddf)
        total, terms = loss({"fixed": batch["fixed"], "warped": warped, "ddf": ddf})
        if not torch.isfinite(total):
            raise FloatingPointError(f"{name}: loss is {total.item()} at step {step}")
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()
        if step % max(1, config.steps // 10) == 0 or step == config.steps - 1:
            parts = ", ".join(f"{k} {v.item():.4f}" for k, v in terms.items())
            log(f"{name} step {step}: loss {total.item():.4f} ({parts})")
    return time.perf_counter() - start


def mean_dice(
    fixed_label: torch.Tensor, warped_label: torch.Tensor, num_labels: int
) -> torch.Tensor:
    """Per-pair Dice ``(B,)``: mean over the labels present in either ``(B, 1, *S)`` map."""
    eye = torch.eye(num_labels, device=fixed_label.device)
    as_onehot = lambda labels: eye[labels[:, 0]].movedim(-1, 1)  # noqa: E731
    per_label = compute_dice(
        as_onehot(warped_label), as_onehot(fixed_label), include_background=True, ignore_empty=True
    )
    return per_label.nanmean(dim=1)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, config: AccuracyConfig, chunk: int = 16) -> dict[str, float]:
    """Validation Dice (mean, std over pairs), identity Dice, % folding, inference ms per pair."""
    device = torch.device(config.device)
    data = SyntheticPairs(
        config.shape,
        num_labels=NUM_LABELS,
        length=config.val_pairs,
        seed=config.seed + VAL_SEED_OFFSET,
        same_contrast=config.same_contrast,
    )
    model.eval()
    dice, identity, folding, seconds = [], [], [], 0.0
    for first in range(0, config.val_pairs, chunk):
        batch = _batch(data, range(first, min(first + chunk, config.val_pairs)), device)
        start = time.perf_counter()
        ddf = model(batch["fixed"], batch["moving"])
        seconds += time.perf_counter() - start
        warped_label = warp_labels(batch["moving_label"], ddf, method="nearest")
        dice += mean_dice(batch["fixed_label"], warped_label, NUM_LABELS).tolist()
        identity += mean_dice(batch["fixed_label"], batch["moving_label"], NUM_LABELS).tolist()
        det = jacobian_determinant(ddf.float())
        folding += ((det <= 0).flatten(1).float().mean(1) * 100).tolist()
    return {
        "dice": statistics.fmean(dice),
        "dice_std": statistics.stdev(dice) if len(dice) > 1 else math.nan,
        "identity_dice": statistics.fmean(identity),
        "folding_pct": statistics.fmean(folding),
        "infer_ms": seconds / config.val_pairs * 1e3,
    }


def run_accuracy_benchmark(
    config: AccuracyConfig, log: Callable[[str], None] = print
) -> list[dict]:
    """Train and validate each of ``config.models``; one row per model (keys: ``model``,
    ``params``, ``steps``, ``train_s`` and those of :func:`evaluate`)."""
    if len(config.shape) != 2:
        raise ValueError(f"accuracy shape must be 2D, got {list(config.shape)}")
    if config.steps < 1 or config.batch_size < 1 or config.val_pairs < 1:
        raise ValueError("accuracy steps, batch size and validation pairs must be >= 1")
    unknown = [key for key in config.models if key not in MODELS]
    if unknown:
        raise ValueError(f"unknown accuracy models {unknown}; choose from {list(MODELS)}")
    rows = []
    for key in config.models:
        torch.manual_seed(config.seed)
        model = build_benchmark_model(key, 2).to(config.device)
        seconds = train(model, config, log, name=key)
        row = {"model": MODELS[key], "params": count_parameters(model), "steps": config.steps}
        row["train_s"] = seconds
        row.update(evaluate(model, config))
        log(f"{key}: {row}")
        rows.append(row)
    return rows
