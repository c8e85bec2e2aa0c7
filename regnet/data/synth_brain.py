"""Contrast-agnostic brain registration pairs generated on the fly (SynthMorph-style).

A network trained on these pairs never sees a real intensity: every pair is rendered from label
maps with new random contrasts, so T1, T2 or FLAIR scans, with or without skull, thick-sliced or
not, in any pose, are all equally familiar. Geometry follows :mod:`regnet.spatial` (tensor axes
``i, j, k`` of the bank's RAS grid, fields in voxels, backward mapping); millimetre settings are
converted with the bank's voxel spacing.

Item generation (every random number from the item's CPU generator, the tensors on ``device``):

1. **Source**: with probability ``bank_fraction`` a real label map of the bank
   (:mod:`regnet.data.label_bank`: six DK donors, the ICBM152 template's tissue and DK maps),
   otherwise random shapes: the argmax of ``num_labels - 1`` smooth noise channels (labels
   ``1 .. K-1``) inside a random smooth blob (background outside).
2. **Pose**: the moving label map is the source under a random rigid pose (nearest neighbour),
   so neither side sits in the bank's centred position.
3. **Shells** (render-only labels ``K, K+1, K+2``: CSF, skull, scalp) around the brain of the
   moving map: level sets at random distances (CSF 0–3 mm, skull and scalp 2–7 mm each) of the
   brain mask blurred by a Gaussian of 2 voxels, in background voxels only.
4. **Field**: ``t = compose(affine, exp(v))`` (the local field ``v`` first, then the affine:
   rotations uniform in ``±max_rotation_deg`` about each axis, translations ``±max_translation_mm``,
   log scales, shears), ``v`` a smooth stationary velocity integrated by scaling and squaring on a
   grid ``field_downsize`` times coarser and upsampled. The fixed render map is the moving one
   warped by ``t`` with linear one-hot interpolation, so
   ``warp_labels(moving_label, target_ddf, "onehot") == fixed_label``.
5. **Rendering**, independently per side: a contrast (T1-, T2-, FLAIR-like tissue means with
   jitter per label, or uniform random means per label), shells shown or not (``shell_prob``
   each side: neither, one or both sides skull-stripped; hidden shells take the background
   intensity), blur, a smooth multiplicative bias field, thick slices (``thick_slice_prob``:
   the image averaged over slabs of 2..``max_slice_factor`` voxels along a random axis and
   interpolated back, aligned with the slabs' centres), Gaussian noise, min-max normalisation to
   ``[0, 1]``, a random gamma.
6. **Labels returned**: the render maps with shell labels set to 0 (background). Shells are not
   anatomy a user registers, and they exist on one side only when the other is skull-stripped,
   so the Dice loss (which leaves background out) never asks the network to align them.

Speed, one CPU thread (2-core machine shared with other jobs, so the ranges are load; median of
5 pairs, all augmentations on): 96x112x96 0.8-1.5 s per pair from the bank, 1.0-1.7 s from
random shapes; 64^3 0.14-0.25 s and 0.16-0.36 s. Half of it is the one-hot warp of the labels.
A training step of ``experiment=synth_brain_2mm`` (diffeomorphic U-Net, 96x112x96) takes
3.3-3.9 s on 2 threads, so one DataLoader worker keeps up; on a GPU pass ``device="cuda"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from regnet.data.label_bank import LABEL_TISSUE, NUM_BRAIN_LABELS, load_label_bank
from regnet.data.synthetic import item_generator, one_thread, smooth_noise
from regnet.spatial import affine_matrix, affine_to_ddf, compose, integrate, warp_labels
from regnet.spatial.smooth import gaussian_smooth
from regnet.spatial.warp import one_hot, resize_ddf, warp

SHELLS = ("csf", "skull", "scalp")
"""Render-only labels ``num_labels + i`` around the brain (see module docstring)."""

_SHELL_MM = ((0.0, 3.0), (2.0, 7.0), (2.0, 7.0))  # thickness range of each shell
_SHELL_SIGMA = 2.0  # voxels; Gaussian blur of the brain mask whose level sets bound the shells
_TARGET_SIGMA = 1.0  # voxels; blur of the similarity targets (widens their gradients' reach)

# Tissue means per contrast, columns: background, CSF, white, grey, deep grey, skull, scalp.
_PRESETS = torch.tensor(
    [
        [0.0, 0.15, 0.85, 0.50, 0.62, 0.08, 0.75],  # T1-like
        [0.0, 0.95, 0.35, 0.55, 0.45, 0.05, 0.60],  # T2-like
        [0.0, 0.08, 0.50, 0.65, 0.55, 0.05, 0.70],  # FLAIR-like
    ]
)
CONTRASTS = ("t1", "t2", "flair", "random")


def _render_classes(num_labels: int) -> torch.Tensor:
    """Column of :data:`_PRESETS` per render label ``0 .. num_labels + 2``."""
    return torch.tensor([*LABEL_TISSUE[:num_labels].tolist(), 1, 5, 6], dtype=torch.long)


class SynthBrainPairs(Dataset):
    """Contrast-agnostic brain pairs with a known field (see module docstring).

    Item ``i`` is a deterministic function of ``(seed, i)``; any index ``>= 0`` is valid
    (``unlimited``). Item (no batch axis, ``S = shape``), tensors on ``device``:

    * ``fixed``, ``moving``: ``(1, *S)`` float32 in ``[0, 1]``;
    * ``fixed_label``, ``moving_label``: ``(1, *S)`` int64 in ``0 .. num_labels-1``;
    * ``target_ddf``: ``(3, *S)`` float32, voxels, backward field on the fixed grid.

    Args:
        shape: spatial size (3 entries); bank maps are centre-cropped or zero-padded to it.
        bank: folder of the label bank (``scripts/prepare_brain_labels.py``), or ``None`` for
            random shapes only.
        bank_fraction: probability that a pair comes from the bank rather than random shapes.
        num_labels: label values ``K``, at most the bank table's 20 (random shapes may use fewer).
        length: items of one pass (``len()``).
        seed: base seed (non-negative).
        spacing_mm: voxel size without a bank (the bank's own spacing otherwise).
        shape_spacing_mm: size of the random shapes (mm between independent noise samples).
        velocity_std_mm: largest standard deviation of the velocity (each item draws its own
            in ``[1/2, 1] x``); velocity_spacing_mm: its smoothness; integration_steps,
            field_downsize: scaling and squaring steps, on a grid this many times coarser.
        max_rotation_deg, max_translation_mm, max_log_scale, max_shear: the affine part of the
            field, uniform in ``±`` each (three angles, three translations ...).
        pose_rotation_deg, pose_translation_mm: the moving side's own random rigid pose.
        shell_prob: probability that one side shows the CSF/skull/scalp shells.
        contrast_weights: relative frequency of each of :data:`CONTRASTS`.
        contrast_jitter: standard deviation of the per-label jitter of the preset contrasts.
        max_blur_sigma: blur sigma (voxels) uniform in ``[0, max]`` per image.
        max_bias_std, bias_spacing_mm: bias ``exp(b)``, ``b`` of standard deviation uniform in
            ``[0, max]``, smoothness in mm.
        thick_slice_prob, max_slice_factor: probability and largest slab of the thick slices.
        max_noise_std: noise standard deviation uniform in ``[0, max]`` (image in ``[0, 1]``).
        gamma_std: the normalised image is raised to ``exp(g)``, ``g ~ N(0, gamma_std)``.
        easy_prob: probability of an easy pair: both sides rendered with the T1-like preset
            (the same jittered intensity per label), shells hidden, no blur, bias, thick
            slices, noise or gamma; the geometry is that of any pair.
        curriculum_items: over item indices ``0 .. curriculum_items`` that probability falls
            linearly from 1 to ``easy_prob`` (a training epoch of an unlimited dataset
            draws indices ``epoch * length + permutation``, so the index tracks training
            progress): a network first learns to match clean same-contrast pairs, then the
            invariances, instead of staying at the zero field (docs/benchmarks.md, "Training
            the brain network").
        similarity_targets: also return ``fixed_target`` and ``moving_target`` ``(1, *S)``: the
            two label maps rendered with one shared random intensity per label (background
            and shells 0), blurred by 1 voxel, no bias or noise. Image similarity on them
            (``loss=mse+...``, :class:`~regnet.RegistrationModule` uses them in place of the
            inputs) is a dense signal that needs no contrast invariance from the loss; it
            breaks the plateau where Dice alone leaves the field at zero (docs/benchmarks.md,
            "Training the brain network").
        device: where items are generated and returned (``None``: CPU); on a GPU use the
            DataModule with ``num_workers=0`` and ``pin_memory=false``.
    """

    unlimited = True
    in_channels = 1
    ndim = 3

    def __init__(
        self,
        shape: Sequence[int],
        bank: str | Path | None = None,
        bank_fraction: float = 0.8,
        num_labels: int = NUM_BRAIN_LABELS,
        length: int = 1000,
        seed: int = 0,
        spacing_mm: float = 2.0,
        shape_spacing_mm: float = 24.0,
        velocity_std_mm: float = 6.0,
        velocity_spacing_mm: float = 32.0,
        integration_steps: int = 7,
        field_downsize: int = 2,
        max_rotation_deg: float = 30.0,
        max_translation_mm: float = 20.0,
        max_log_scale: float = 0.1,
        max_shear: float = 0.05,
        pose_rotation_deg: float = 15.0,
        pose_translation_mm: float = 10.0,
        shell_prob: float = 0.5,
        contrast_weights: Mapping[str, float] | None = None,
        contrast_jitter: float = 0.05,
        max_blur_sigma: float = 1.0,
        max_bias_std: float = 0.3,
        bias_spacing_mm: float = 64.0,
        thick_slice_prob: float = 0.3,
        max_slice_factor: int = 5,
        max_noise_std: float = 0.05,
        gamma_std: float = 0.25,
        easy_prob: float = 0.0,
        curriculum_items: int = 0,
        similarity_targets: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        self.shape = tuple(int(n) for n in shape)
        name = type(self).__name__
        if len(self.shape) != 3 or min(self.shape) < 4:
            raise ValueError(f"{name}: shape must have 3 entries, each >= 4, got {list(shape)}")
        if not 2 <= num_labels <= NUM_BRAIN_LABELS:
            raise ValueError(
                f"{name}: num_labels must be in 2..{NUM_BRAIN_LABELS} (the brain label table), "
                f"got {num_labels}"
            )
        if length < 1 or seed < 0 or integration_steps < 0 or field_downsize < 1:
            raise ValueError(
                f"{name}: need length >= 1, seed >= 0, integration_steps >= 0 and "
                f"field_downsize >= 1, got {length}, {seed}, {integration_steps}, {field_downsize}"
            )
        if not (0 <= bank_fraction <= 1 and 0 <= shell_prob <= 1 and 0 <= thick_slice_prob <= 1):
            raise ValueError(
                f"{name}: bank_fraction, shell_prob and thick_slice_prob must lie in [0, 1], got "
                f"{bank_fraction}, {shell_prob}, {thick_slice_prob}"
            )
        if max_slice_factor < 2:
            raise ValueError(f"{name}: max_slice_factor must be >= 2, got {max_slice_factor}")
        weights = dict(contrast_weights or {"t1": 1, "t2": 1, "flair": 1, "random": 2})
        unknown = sorted(set(weights) - set(CONTRASTS))
        if unknown or min(weights.values()) < 0 or sum(weights.values()) <= 0:
            raise ValueError(
                f"{name}: contrast_weights must give non-negative weights to {list(CONTRASTS)} "
                f"(not all zero), got {weights}"
            )
        self.contrast_weights = torch.tensor([float(weights.get(c, 0)) for c in CONTRASTS])
        self.num_labels = int(num_labels)
        self.length = int(length)
        self.seed = int(seed)
        self.device = torch.device(device or "cpu")
        self.bank = None
        self.spacing = float(spacing_mm)
        if bank is not None and bank_fraction > 0:
            self.bank, self.spacing = load_label_bank(bank, self.shape)
            largest = int(self.bank.max())
            if largest >= self.num_labels:
                raise ValueError(
                    f"{name}: bank {bank} holds label {largest} but num_labels is {num_labels}"
                )
            self.bank = self.bank.to(self.device)
        self.bank_fraction = float(bank_fraction) if self.bank is not None else 0.0
        mm = 1.0 / self.spacing
        self.shape_spacing = shape_spacing_mm * mm
        self.velocity_std = velocity_std_mm * mm
        self.velocity_spacing = velocity_spacing_mm * mm
        self.integration_steps = int(integration_steps)
        self.field_downsize = int(field_downsize)
        self.max_rotation = math.radians(max_rotation_deg)
        self.max_translation = max_translation_mm * mm
        self.max_log_scale = float(max_log_scale)
        self.max_shear = float(max_shear)
        self.pose_rotation = math.radians(pose_rotation_deg)
        self.pose_translation = pose_translation_mm * mm
        self.shell_prob = float(shell_prob)
        self.shell_mm = _SHELL_MM
        self.contrast_jitter = float(contrast_jitter)
        self.max_blur_sigma = float(max_blur_sigma)
        self.max_bias_std = float(max_bias_std)
        self.bias_spacing = bias_spacing_mm * mm
        self.thick_slice_prob = float(thick_slice_prob)
        self.max_slice_factor = int(max_slice_factor)
        self.max_noise_std = float(max_noise_std)
        self.gamma_std = float(gamma_std)
        self.render_classes = _render_classes(self.num_labels)
        self.similarity_targets = bool(similarity_targets)
        if not 0 <= easy_prob <= 1 or curriculum_items < 0:
            raise ValueError(
                f"{name}: easy_prob must lie in [0, 1] and curriculum_items be >= 0, "
                f"got {easy_prob}, {curriculum_items}"
            )
        self.easy_prob = float(easy_prob)
        self.curriculum_items = int(curriculum_items)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            raise IndexError(f"{type(self).__name__}: index must be >= 0, got {index}")
        easy = self.easy_prob_at(int(index))
        if self.device.type != "cpu":
            return self.generate(item_generator(self.seed, int(index)), easy)
        with one_thread():
            return self.generate(item_generator(self.seed, int(index)), easy)

    def easy_prob_at(self, index: int) -> float:
        """Probability that item ``index`` is easy: 1 at index 0, falling linearly to
        ``easy_prob`` at ``curriculum_items`` and staying there."""
        if index >= self.curriculum_items:
            return self.easy_prob
        return 1.0 - index / self.curriculum_items * (1.0 - self.easy_prob)

    def generate(
        self, generator: torch.Generator, easy_prob: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Draw one pair from the CPU ``generator``; see the class docstring for the keys.

        ``easy_prob`` (default: the ``easy_prob`` setting) is the probability of an easy pair:
        both sides rendered with the T1-like preset (the same jittered intensity per label),
        shells hidden, without blur, bias, thick slices, noise or gamma (geometry as for any
        pair).
        """
        if easy_prob is None:
            easy_prob = self.easy_prob
        source = self._source(generator)
        pose = self._affine_ddf(generator, self.pose_rotation, self.pose_translation, rigid=True)
        render = warp_labels(source, pose, "nearest")
        render = self._add_shells(render, generator)
        target_ddf = self._random_field(generator)
        moving_label = torch.where(render < self.num_labels, render, 0)
        fixed_label, fixed_render = self._warp_render(render, moving_label, target_ddf)
        if self._rand(generator, 1).item() < easy_prob:
            means = self._means(generator, easy=True)
            fixed, moving = (_normalise(means[m]) for m in (fixed_render, render))
        else:
            fixed = self._render(fixed_render, self._means(generator), generator)
            moving = self._render(render, self._means(generator), generator)
        item = {
            "fixed": fixed[0],
            "moving": moving[0],
            "fixed_label": fixed_label[0],
            "moving_label": moving_label[0],
            "target_ddf": target_ddf[0],
        }
        if self.similarity_targets:
            means = self._rand(generator, self.num_labels).to(self.device)
            means[0] = 0.0
            for side in ("fixed", "moving"):
                target = gaussian_smooth(means[item[f"{side}_label"]][None], _TARGET_SIGMA)
                item[f"{side}_target"] = target[0]
        return item

    def _warp_render(
        self, render: torch.Tensor, labels: torch.Tensor, ddf: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed labels and render map: one linear warp of the one-hot channels of the labels
        present (shells count as background, so the labels are exactly
        ``warp_labels(labels, ddf, "onehot")``) and of the shells, which then split the
        background voxels among themselves and the background by the same argmax."""
        zero = torch.zeros(1, dtype=labels.dtype, device=labels.device)
        present = torch.unique(torch.cat([zero, labels.flatten()]))  # sorted, 0 first
        count = present.numel()
        shells = [(render == self.num_labels + s).float() for s in range(len(SHELLS))]
        channels = torch.cat([one_hot(torch.searchsorted(present, labels), count), *shells], 1)
        warped = warp(channels, ddf)
        # max().indices is the argmax (as in warp_labels); the first of equal values wins
        fixed_label = present[warped[:, :count].max(dim=1, keepdim=True).indices]
        background = warped[:, :1] - warped[:, count:].sum(dim=1, keepdim=True)
        outside = torch.cat([background, warped[:, count:]], 1).max(dim=1, keepdim=True).indices
        shell = (fixed_label == 0) & (outside > 0)
        return fixed_label, torch.where(shell, self.num_labels - 1 + outside, fixed_label)

    # ------------------------------------------------------------------ label maps
    def _rand(self, generator: torch.Generator, *size: int) -> torch.Tensor:
        return torch.rand(*size, generator=generator)

    def _source(self, generator: torch.Generator) -> torch.Tensor:
        """Label map ``(1, 1, *S)`` int64: a bank map or random shapes in a random blob."""
        choice = self._rand(generator, 2)
        if self.bank is not None and choice[0] < self.bank_fraction:
            index = int(choice[1] * self.bank.shape[0])
            return self.bank[index : index + 1].long()
        noise = smooth_noise(
            self.shape, self.num_labels - 1, self.shape_spacing, generator, self.device
        )
        radii = 0.3 + 0.15 * self._rand(generator, 3)
        axes = [
            (torch.arange(n, device=self.device) - (n - 1) / 2) / (r.item() * n)
            for n, r in zip(self.shape, radii, strict=True)
        ]
        grid = torch.meshgrid(*axes, indexing="ij")
        blob = sum(a.square() for a in grid)
        wobble = smooth_noise(self.shape, 1, self.shape_spacing * 2, generator, self.device)
        inside = (blob + 0.2 * wobble[0, 0]) < 1
        labels = noise.max(dim=1, keepdim=True).indices + 1
        return torch.where(inside, labels, 0)

    def _add_shells(self, render: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Shell labels ``K + i`` in the background at random distances from the brain."""
        low, high = torch.tensor(self.shell_mm).T
        thickness = (low + (high - low) * self._rand(generator, len(SHELLS))) / self.spacing
        outer = torch.cumsum(thickness, 0)
        blurred = gaussian_smooth((render > 0).float(), _SHELL_SIGMA)
        out = render.clone()
        background = render == 0
        for shell in reversed(range(len(SHELLS))):  # outermost first, inner ones overwrite
            level = 0.5 * math.erfc(outer[shell].item() / (_SHELL_SIGMA * math.sqrt(2)))
            out[background & (blurred > level)] = self.num_labels + shell
        return out

    # ------------------------------------------------------------------ geometry
    def _uniform(self, generator: torch.Generator, size: int, bound: float) -> torch.Tensor:
        """``(1, size)`` uniform in ``[-bound, bound]``."""
        return (2 * self._rand(generator, 1, size) - 1) * bound

    def _affine_ddf(
        self, generator: torch.Generator, rotation: float, translation: float, rigid: bool
    ) -> torch.Tensor:
        """DDF ``(1, 3, *S)`` of a random affine about the grid centre (rigid if ``rigid``)."""
        matrix = affine_matrix(
            translation=self._uniform(generator, 3, translation),
            rotation=self._uniform(generator, 3, rotation),
            log_scale=None if rigid else self._uniform(generator, 3, self.max_log_scale),
            shear=None if rigid else self._uniform(generator, 3, self.max_shear),
            centre=[(n - 1) / 2 for n in self.shape],
        )
        return affine_to_ddf(matrix.to(self.device), self.shape)

    def _random_field(self, generator: torch.Generator) -> torch.Tensor:
        """``compose(affine_ddf, exp(velocity))``, ``(1, 3, *S)`` voxels."""
        f = self.field_downsize
        coarse = [(n - 1) // f + 1 for n in self.shape]
        scale = self.velocity_std * (0.5 + 0.5 * self._rand(generator, 1).item()) / f
        velocity = smooth_noise(coarse, 3, self.velocity_spacing / f, generator, self.device)
        local = resize_ddf(integrate(velocity * scale, self.integration_steps), self.shape)
        affine = self._affine_ddf(generator, self.max_rotation, self.max_translation, rigid=False)
        return compose(affine, local)

    # ------------------------------------------------------------------ rendering
    def _means(self, generator: torch.Generator, easy: bool = False) -> torch.Tensor:
        """Intensity per render label ``(K + 3,)``: a preset contrast with jitter, or random;
        shells hidden (background intensity) unless this side shows them. ``easy``: the
        T1-like preset, shells hidden."""
        count = self.render_classes.numel()
        contrast = (
            0 if easy else int(torch.multinomial(self.contrast_weights, 1, generator=generator))
        )
        jitter = torch.randn(count, generator=generator) * self.contrast_jitter
        uniform = self._rand(generator, count)
        show_shells = self._rand(generator, 1).item() < self.shell_prob and not easy
        if CONTRASTS[contrast] == "random":
            means = uniform
        else:
            means = (_PRESETS[contrast][self.render_classes] + jitter).clamp(0, 1)
        if not show_shells:
            means[self.num_labels :] = means[0]
        return means.to(self.device)

    def _render(
        self, render: torch.Tensor, means: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Image ``(1, 1, *S)`` in ``[0, 1]`` from a render label map ``(1, 1, *S)`` and the
        intensity per render label ``means`` (:meth:`_means`)."""
        image = means[render]
        draws = self._rand(generator, 6)
        image = gaussian_smooth(image, self.max_blur_sigma * draws[0].item())
        bias = smooth_noise(self.shape, 1, self.bias_spacing, generator, self.device)
        image = image * torch.exp(self.max_bias_std * draws[1].item() * bias)
        if draws[2] < self.thick_slice_prob:
            axis = int(draws[3] * 3)
            factor = 2 + int(draws[4] * (self.max_slice_factor - 1))
            image = thick_slices(image, axis, factor)
        noise = torch.randn(image.shape, generator=generator).to(self.device)
        image = image + self.max_noise_std * draws[5].item() * noise
        gamma = math.exp(self.gamma_std * torch.randn(1, generator=generator).item())
        return _normalise(image) ** gamma


def _normalise(image: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation to ``[0, 1]``."""
    low, high = image.min(), image.max()
    return ((image - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)


def thick_slices(image: torch.Tensor, axis: int, factor: int) -> torch.Tensor:
    """Simulate slices ``factor`` voxels thick along spatial ``axis`` of ``(B, C, X, Y, Z)``.

    Slab ``s`` (voxels ``factor s .. factor s + factor - 1``, the last one padded by repeating
    the border) is averaged, and the slabs are interpolated back linearly with slab ``s``'s value
    at its centre ``factor s + (factor - 1) / 2``: the image is blurred along ``axis`` without
    shifting it.
    """
    size = image.shape[2 + axis]
    padded = -(-size // factor) * factor
    pad = [0] * 6  # F.pad lists the last axis first
    pad[2 * (2 - axis) + 1] = padded - size
    kernel = [1, 1, 1]
    kernel[axis] = factor
    slabs = F.avg_pool3d(F.pad(image, pad, mode="replicate"), kernel, stride=kernel)
    full = list(image.shape[2:])
    full[axis] = padded
    out = F.interpolate(slabs, size=full, mode="trilinear", align_corners=False)
    return out.narrow(2 + axis, 0, size)
