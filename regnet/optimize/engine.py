"""Per-pair registration by gradient descent on regnet's own transforms and losses.

Both images lie on one grid (the fixed grid, see :mod:`regnet.spatial` for the conventions);
the result is a DDF on that grid in its voxels, backward (fixed -> moving). The procedure:

1. a start (:mod:`regnet.optimize.initialize`): the identity, a translation superimposing
   intensity centroids, or a multi-start rigid search about the foreground centroids scored by
   the affine stage's similarity on the coarsest level; where one image holds content the
   other lacks, the similarity is then restricted to their overlap
   (:mod:`regnet.optimize.overlap`);
2. an affine stage (rigid or affine parameters about the image centre) through a pyramid,
   coarse to fine, when the transform is rigid/affine or precedes a deformable one;
3. a deformable stage through the pyramid: cubic B-spline control points, a dense DDF or a
   stationary velocity field (SVF, on a grid of half the level's resolution, integrated there
   by scaling and squaring and upsampled), each level starting from the previous level's field
   (:func:`regnet.spatial.resize_ddf`). With ``mind_sampling`` a ``mind`` term is compared
   on warped descriptors at sampled voxels (:mod:`regnet.optimize.sampled`), the finest level
   optionally ending with ``polish_iterations`` steps on the dense term.

The total transform is ``x -> A (x + v(x))`` (``compose(affine_ddf, local_ddf)``, evaluated
exactly by applying the matrix to ``x + v(x)``), and on every evaluation the moving image of the
level is sampled once with it. Adam optimises the parameters against
:func:`regnet.losses.build_loss` (image terms get the fixed mask, times the warped moving mask),
plus an optional landmark term. The affine stage may use its own similarity (``affine_loss``,
e.g. ``mi``, which tolerates different contrast and preprocessing) while the deformable stage uses
``loss``. Each level's images, loss, objective and Adam loop: :mod:`regnet.optimize.levels`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from regnet.losses.composite import DEFAULT_WEIGHTS, parse_spec
from regnet.optimize.contrast import AUTO, choose_loss, local_correlation
from regnet.optimize.initialize import (
    centre_of_mass_translation,
    dilate,
    foreground_mask,
    search_level,
)
from regnet.optimize.levels import (
    Level,
    LevelHistory,
    level_loss,
    level_objective,
    run_adam,
    terms_of,
)
from regnet.optimize.overlap import overlap_region
from regnet.optimize.pyramid import downsample, level_shapes, level_step
from regnet.optimize.sampled import POOLED_TERMS, SampledMIND, SampledPooled
from regnet.optimize.transforms import (
    AffineParameters,
    BSplineField,
    DenseField,
    after,
    velocity_shape,
)
from regnet.spatial import (
    apply_affine,
    control_grid_shape,
    identity_grid,
    resize_ddf,
)

AFFINE_TRANSFORMS = ("rigid", "affine")
DEFORMABLE_TRANSFORMS = ("bspline", "ddf", "svf")
TRANSFORMS = AFFINE_TRANSFORMS + DEFORMABLE_TRANSFORMS
INITS = ("identity", "com", "search")

DEFAULT_ITERATIONS = {
    "rigid": (100, 60, 30),
    "affine": (100, 60, 30),
    "bspline": (100, 60, 30),
    "ddf": (100, 60, 30),
    "svf": (60, 40, 15),
}
"""Iterations per level (coarse to fine) for a three-level pyramid. For ``svf`` the finest level
dominates the time: on the 4 demo pairs at 2 mm (``docs/benchmarks.md``, "Engine settings") 15
finest iterations instead of 30 gave mean Dice 0.474 instead of 0.478 in 0.71x the time; on the
real-scan benchmark at 2 mm (``docs/benchmarks.md``, "Real scans") 60/40 coarse iterations
instead of 100/60 (with 4 squaring steps instead of 5) changed the EPE by -0.003..+0.004 mm in
16 scenarios (4-6 and 10-12 mm deformations) in 0.86-0.88x the registration time."""

FINE_GRID_FINEST_SVF_ITERATIONS = 25
"""Finest-level ``svf`` iterations by default when ``spacing`` says the input grid is finer than
2 mm (``register.py``'s ``spacing=auto`` works on 1.5 mm for 1 mm scans). In two runs of the
1 mm real-scan benchmark (``docs/benchmarks.md``, "Real scans at 1 mm") 25 instead of 15 raised
Dice in all 8 scenarios (by 0.001-0.006) and lowered the end-point error (by 0.01-0.025 mm) for
about 1.17x the registration time; on 2 mm grids, where the finest level is the larger share of
the time, they cost 1.2x for Dice within 0.003, so those keep 15."""

EXACT_SVF_GRADIENT_TERMS = ("lncc",)
"""``exact_svf_gradient="auto"``: deformable similarity terms whose SVF is differentiated through
scaling and squaring; with the others (``mind``) the first-order gradient. Between two people's
brains, where ``loss="auto"`` picks ``lncc``, the displacement's Jacobian is far from the identity
that the first-order gradient assumes: the exact one raised Dice on all three inter-subject sets
(``docs/benchmarks.md``; demo pairs 0.464 -> 0.475, 4 of 4; six people's slices 0.774 -> 0.779,
27 of 30; Colin27 against the ICBM template at 1 mm 0.753 -> 0.755, 2 of 2) for 1.1-1.3x the
registration time. With ``mind`` on one brain's scans the first-order gradient changed the
end-point error by -0.008..+0.015 mm in 0.77x the time ("Real scans"), and on the demo pairs the
exact one changed Dice by 0.001."""

DEFAULT_LR = {"rigid": 0.5, "affine": 0.5, "bspline": 0.5, "ddf": 0.5, "svf": 0.25}
"""Adam learning rates in voxels of the level being optimised."""

MIN_LATTICE_SAMPLES = 1024
"""Fewest voxels per lattice offset for the affine pre-stage's pooled similarity (MI) to be
evaluated on a stride-2 lattice instead of every voxel. On the real-scan benchmark at 2 mm
(``docs/benchmarks.md``, "Real scans"; 2.3k and 18k voxels per offset on the two coarse
levels of a 2 mm brain) this left the EPE within 0.003 mm and Dice within 0.001 in all 8
scenarios, the affine stage taking a third of the time (elastix and ANTs sample a few thousand
voxels per iteration)."""

REFINE_TRANSFORMS = ("svf", "ddf")
"""Transforms :func:`refine` composes with (``svf``) or adds to (``ddf``) a network's field."""


@dataclass
class RegistrationResult:
    """Outcome of :func:`register`, tensors on the registration device.

    Attributes:
        ddf: ``(1, ndim, *S)`` total displacement (affine then local), voxels of the fixed grid,
            backward: ``warped(x) = moving(x + ddf(x))``.
        matrix: ``(1, ndim+1, ndim+1)`` fixed -> moving voxel affine, or ``None`` without one.
        local_ddf: ``(1, ndim, *S)`` deformable part ``v`` (``ddf(x) = A (x + v(x)) - x``), or
            ``None`` for rigid/affine transforms.
        history: per stage and level, the loss after every iteration.
        seconds: wall time of the whole registration.
        loss: the deformable stage's loss spec (``loss="auto"``: the one chosen).
        contrast_correlation: ``loss="auto"``: the local correlation that chose it
            (:mod:`regnet.optimize.contrast`), else ``None``.
        exact_svf_gradient: ``svf``: whether scaling and squaring was differentiated exactly
            (``exact_svf_gradient="auto"``: the choice), else ``None``.
    """

    ddf: torch.Tensor
    matrix: torch.Tensor | None
    local_ddf: torch.Tensor | None
    history: list[LevelHistory]
    seconds: float
    loss: str | None = None
    contrast_correlation: float | None = None
    exact_svf_gradient: bool | None = None


def _check_image(tensor: torch.Tensor, name: str, shape: Sequence[int] | None) -> None:
    if tensor.dim() not in (4, 5) or tensor.shape[0] != 1:
        raise ValueError(
            f"{name} must have shape (1, C, *S) with 2 or 3 spatial dims, got {tuple(tensor.shape)}"
        )
    if shape is not None and tuple(tensor.shape[2:]) != tuple(shape):
        raise ValueError(
            f"{name} spatial shape {tuple(tensor.shape[2:])} differs from the fixed "
            f"image's {tuple(shape)}"
        )


def _check_per_level(values: Sequence, levels: int, name: str) -> tuple:
    values = tuple(values)
    if len(values) != levels:
        raise ValueError(f"{name} needs one value per level ({levels}), got {list(values)}")
    return values


def register(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    transform: str = "svf",
    loss: str | None = "lncc+grad",
    weights: Mapping[str, float] | None = None,
    levels: int = 3,
    iterations: Sequence[int] | None = None,
    lr: float | None = None,
    *,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    fixed_landmarks: torch.Tensor | None = None,
    moving_landmarks: torch.Tensor | None = None,
    landmark_weight: float = 1.0,
    init: str = "com",
    affine_first: bool = True,
    affine_model: str = "affine",
    affine_loss: str | None = None,
    search_iterations: int = 20,
    overlap_margin: float | None = None,
    affine_iterations: Sequence[int] | None = None,
    affine_lr: float | None = None,
    spacing: Sequence[float] | None = None,
    initial_ddf: torch.Tensor | None = None,
    initial_matrix: torch.Tensor | None = None,
    defer_losses: Sequence[str] = (),
    windows: Sequence[int] | None = None,
    loss_options: Mapping[str, Mapping[str, Any]] | None = None,
    smoothing: float = 1.0,
    control_spacing: float = 5.0,
    integration_steps: int = 7,
    exact_svf_gradient: bool | str = True,
    mind_sampling: bool = False,
    polish_iterations: int = 0,
    affine_sampling: bool = False,
    device: str | torch.device | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` by gradient descent; both on the same grid.

    Args:
        fixed, moving: ``(1, C, *S)`` images (2D or 3D) on one grid.
        transform: ``"rigid"``, ``"affine"``, ``"bspline"``, ``"ddf"`` or ``"svf"``.
        loss: :func:`regnet.losses.build_loss` spec (e.g. ``"lncc+grad"``; regularisers see the
            deformable displacement in level voxels, zero during the affine stage), ``None``
            for the landmark term alone, or ``"auto"``: after the affine stage, ``lncc+grad``
            when the aligned images show the same contrast, else ``mind+grad``
            (:mod:`regnet.optimize.contrast`; needs ``affine_loss``).
        weights: weight per loss term name.
        levels: pyramid levels, each twice as coarse as the next (finest: the input grid).
        iterations: Adam steps per level, coarse to fine (0 skips a level; a deformable field
            then passes on to the next level unchanged, so ``(.., .., 0)`` optimises at half
            resolution and upsamples). Defaults: :data:`DEFAULT_ITERATIONS`, with
            :data:`FINE_GRID_FINEST_SVF_ITERATIONS` at the finest ``svf`` level of a grid whose
            ``spacing`` is finer than 2 mm.
        lr: Adam learning rate in voxels of each level (default :data:`DEFAULT_LR`).
        fixed_mask, moving_mask: optional ``(1, 1, *S)`` weights in ``[0, 1]``; image terms are
            restricted to the fixed mask times the moving mask warped to the fixed grid.
        fixed_landmarks, moving_landmarks: optional ``(N, ndim)`` corresponding points in voxel
            coordinates of the grid; adds ``landmark_weight`` times the mean squared distance
            between ``x_f + u(x_f)`` and ``x_m`` (voxels², or mm² when ``spacing`` is given).
        init: ``"identity"``, ``"com"`` (translation aligning intensity centres of mass) or
            ``"search"`` (:func:`regnet.optimize.initialize.search_start` on the coarsest level:
            rotations about the foreground centroids of ``fixed_mask``/``moving_mask``, or of
            :func:`~regnet.optimize.initialize.foreground_mask` without them, each scored by
            the affine stage's loss, the best three polished with ``search_iterations`` rigid
            steps).
        affine_first: for deformable transforms, run an ``affine_model`` (``"rigid"`` or
            ``"affine"``) stage first with ``affine_iterations`` / ``affine_lr`` (defaults: those
            of ``affine_model``, finest level skipped). Ignored when ``initial_ddf`` is given.
        affine_loss: loss spec of the start search and the affine stage (default: ``loss``);
            regularisers see a zero field there. ``weights`` and ``loss_options`` entries of
            its terms apply to it too.
        overlap_margin: after the start, restrict every image term to the *overlap region*:
            the fixed foreground (``fixed_mask``, else
            :func:`~regnet.optimize.initialize.foreground_mask`) within ``overlap_margin`` (mm
            with ``spacing``, else voxels) of the moving foreground as the start places it. It
            replaces both masks for the later stages, so a skull-stripped image is compared
            with the brain of an unstripped one, not with its scalp: without it, the outline of
            a stripped brain is pulled onto the outline of the other head. The affine stage
            uses the region alone (a mask following the warped moving image would let it
            shrink the overlap), the deformable stage the region times the warped moving
            foreground (so that a brain is not stretched into a dark background it lacks).
            Only when the foregrounds' volumes differ by more than
            :data:`OVERLAP_VOLUME_RATIO`, i.e. one image holds tissue the other lacks; else, and
            with ``None``, masks as given.
        spacing: voxel size in mm per axis: rotations are rigid in mm, landmark distances in mm.
        initial_ddf: ``(1, ndim, *S)`` starting field (voxels; e.g. a network's prediction): a
            ``ddf`` transform refines it additively, ``bspline``/``svf`` compose their field
            before it (``x -> x + initial(x + v(x))`` with ``v`` optimised).
        initial_matrix: ``(1, ndim + 1, ndim + 1)`` voxel matrix of an affine alignment found
            before (fixed voxel -> moving voxel of this grid; e.g. an earlier call's ``matrix``
            carried over to another grid): no start and no affine stage, the deformable stage
            starts from it and the overlap region (``overlap_margin``) is taken from it. Needs a
            deformable transform and no ``initial_ddf``.
        defer_losses: with ``loss="auto"``, losses whose deformable stage the caller runs itself:
            when the choice is one of them, return right after the affine stage (``ddf`` the
            affine's, ``local_ddf`` ``None``, ``loss`` the choice). ``register.py`` runs
            ``lncc+grad`` on a finer grid that way.
        windows: LNCC window (odd, level voxels) per level; default 5 on levels coarser than
            half resolution, else 7 (on 1-2 mm images, about 1-2 cm).
        loss_options: keyword arguments per loss term, as for :func:`build_loss`.
        smoothing: Gaussian sigma applied to dense-field parameters at every evaluation, in
            voxels of the field's grid: the level's for ``ddf``, the velocity's (about half the
            level's resolution, :func:`regnet.optimize.transforms.velocity_shape`) for ``svf``.
        control_spacing: B-spline control-point spacing in voxels of the input grid.
        integration_steps: scaling-and-squaring steps for ``svf``.
        exact_svf_gradient: ``svf``: differentiate through scaling and squaring (``True``) or
            hand the displacement's gradient to the velocity unchanged (first order in the
            velocity; skips the costliest backward pass); ``"auto"``: exactly when the
            deformable loss holds a term of :data:`EXACT_SVF_GRADIENT_TERMS`.
        mind_sampling: deformable stage, when ``loss`` holds ``mind`` and its other terms need
            only the field (e.g. ``"mind+grad"``): compare warped moving descriptors at sampled
            fixed voxels (:class:`regnet.optimize.sampled.SampledMIND`) instead of the dense
            ``mind`` term of the warped image. The other terms then see the field on the grid
            of its parameters, in its voxels (an SVF's exponential on the velocity grid),
            unless ``initial_ddf`` is given or the transform is ``bspline``.
        polish_iterations: with ``mind_sampling``, this many further Adam steps on the finest
            level with the dense terms, at half the learning rate, after the sampled ones (they
            help on strongly sheared fields; on real scans they raised the end-point error,
            which is why ``register.py`` runs none by default).
        affine_sampling: the affine stage (a ``rigid``/``affine`` transform's own, or a
            deformable transform's pre-stage) evaluates a pooled similarity
            (:data:`regnet.optimize.sampled.POOLED_TERMS`, e.g. ``mi``) on a stride-2 lattice
            of voxels (:class:`regnet.optimize.sampled.SampledPooled`) on the levels large
            enough (:data:`MIN_LATTICE_SAMPLES`).
        device: where to compute (default: ``fixed``'s device).

    Returns:
        :class:`RegistrationResult`.
    """
    start = time.perf_counter()
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {list(TRANSFORMS)}, got {transform!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
    if polish_iterations < 0:
        raise ValueError(f"polish_iterations must be >= 0, got {polish_iterations}")
    if affine_model not in AFFINE_TRANSFORMS:
        raise ValueError(f"affine_model must be 'rigid' or 'affine', got {affine_model!r}")
    device = torch.device(device) if device is not None else fixed.device
    _check_image(fixed, "fixed", None)
    shape = tuple(fixed.shape[2:])
    ndim = len(shape)
    _check_image(moving, "moving", shape)
    fixed = fixed.to(device, torch.float32)
    moving = moving.to(device, torch.float32)
    masks = {}
    for name, mask in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask)):
        if mask is not None:
            _check_image(mask, name, shape)
            if mask.shape[1] != 1:
                raise ValueError(f"{name} must have one channel, got {tuple(mask.shape)}")
            masks[name] = mask.to(device, torch.float32)
    landmarks = None
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise ValueError("fixed_landmarks and moving_landmarks must be given together")
    if fixed_landmarks is not None:
        fixed_points = torch.as_tensor(fixed_landmarks, dtype=torch.float32, device=device)
        moving_points = torch.as_tensor(moving_landmarks, dtype=torch.float32, device=device)
        if fixed_points.dim() != 2 or fixed_points.shape[1] != ndim:
            raise ValueError(
                f"landmarks must have shape (N, {ndim}), got {tuple(fixed_points.shape)}"
            )
        if fixed_points.shape != moving_points.shape:
            raise ValueError(
                f"fixed landmarks {tuple(fixed_points.shape)} and moving landmarks "
                f"{tuple(moving_points.shape)} must correspond one to one"
            )
        landmarks = (fixed_points, moving_points)
    if not loss and landmarks is None:
        raise ValueError("loss is empty and no landmarks are given: nothing to optimise")
    auto = loss == AUTO
    if exact_svf_gradient not in (True, False, AUTO):
        raise ValueError(
            f"exact_svf_gradient must be true, false or 'auto', got {exact_svf_gradient!r}"
        )
    if auto and not affine_loss:
        raise ValueError("loss='auto' needs affine_loss: the similarity of the affine stage")
    spacing_tensor = None
    if spacing is not None:
        spacing = [float(s) for s in spacing]
        if len(spacing) != ndim or min(spacing) <= 0:
            raise ValueError(f"spacing needs {ndim} positive values, got {spacing}")
        spacing_tensor = torch.tensor(spacing, device=device)
    if initial_ddf is not None:
        if transform in AFFINE_TRANSFORMS:
            raise ValueError(f"initial_ddf needs a deformable transform, got {transform!r}")
        if tuple(initial_ddf.shape) != (1, ndim, *shape):
            raise ValueError(
                f"initial_ddf must have shape {(1, ndim, *shape)}, got {tuple(initial_ddf.shape)}"
            )
        initial_ddf = initial_ddf.detach().to(device, torch.float32)
    if initial_matrix is not None:
        if transform not in DEFORMABLE_TRANSFORMS or initial_ddf is not None:
            raise ValueError("initial_matrix needs a deformable transform and no initial_ddf")
        if tuple(initial_matrix.shape) != (1, ndim + 1, ndim + 1):
            raise ValueError(
                f"initial_matrix must have shape {(1, ndim + 1, ndim + 1)}, "
                f"got {tuple(initial_matrix.shape)}"
            )
        initial_matrix = initial_matrix.detach().to(device, torch.float32)

    shapes = level_shapes(shape, levels)
    deformable = transform in DEFORMABLE_TRANSFORMS
    iterations = _check_per_level(
        iterations if iterations is not None else _default_iterations(transform, levels, spacing),
        levels,
        "iterations",
    )
    windows = _check_per_level(
        windows if windows is not None else [5] * max(levels - 2, 0) + [7] * min(levels, 2),
        levels,
        "windows",
    )
    pyramid = [
        Level(
            index=index,
            shape=level_shape,
            step=level_step(shape, level_shape),
            fixed=downsample(fixed, level_shape),
            moving=downsample(moving, level_shape),
            fixed_mask=(
                downsample(masks["fixed_mask"], level_shape) if "fixed_mask" in masks else None
            ),
            moving_mask=(
                downsample(masks["moving_mask"], level_shape) if "moving_mask" in masks else None
            ),
            loss=None if auto else level_loss(loss, weights, loss_options, windows[index]),
            affine_loss=level_loss(
                affine_loss or loss,
                weights if not affine_loss else terms_of(affine_loss, weights),
                loss_options if not affine_loss else terms_of(affine_loss, loss_options),
                windows[index],
            ),
        )
        for index, level_shape in enumerate(shapes)
    ]
    history: list[LevelHistory] = []

    def objective(level, matrix, local):
        return level_objective(level, matrix, local, landmarks, landmark_weight, spacing_tensor)

    # Affine stage.
    affine = None
    known = initial_ddf is not None or initial_matrix is not None  # a start given by the caller
    run_affine = transform in AFFINE_TRANSFORMS or (affine_first and not known)
    if not known and (run_affine or init != "identity"):
        kind = transform if transform in AFFINE_TRANSFORMS else affine_model
        translation = torch.zeros(ndim, device=device)
        if init == "com":
            translation = centre_of_mass_translation(
                fixed, moving, masks.get("fixed_mask"), masks.get("moving_mask")
            ).float()
        affine = AffineParameters(shape, kind, translation, spacing).to(device)
        if init == "search":
            rigid, record = search_level(
                pyramid[0],
                fixed,
                moving,
                masks,
                spacing,
                objective,
                search_iterations,
                DEFAULT_LR["rigid"],
            )
            with torch.no_grad():
                affine.translation.copy_(rigid.translation)
                affine.rotation.copy_(rigid.rotation)
            history.append(record)
    overlap = None
    start_matrix = initial_matrix if affine is None else affine.matrix().detach()
    if overlap_margin is not None and start_matrix is not None:
        overlap = overlap_region(fixed, moving, masks, start_matrix, overlap_margin, spacing)
    if overlap is not None:
        region, moving_fg = overlap
        for level in pyramid:  # the affine stage sees the fixed region only (a static one)
            level.fixed_mask, level.moving_mask = downsample(region, level.shape), None
    if run_affine:
        kind = affine.kind
        affine_steps = (
            iterations
            if not deformable
            else _check_per_level(
                affine_iterations
                if affine_iterations is not None
                else prestage_iterations(kind, levels),
                levels,
                "affine_iterations",
            )
        )
        rate = lr if not deformable else affine_lr
        rate = DEFAULT_LR[kind] if rate is None else rate
        if affine_sampling and _pooled(affine_loss or loss):
            _use_sampled_pooled(pyramid, affine_steps)
        for level in pyramid:
            record = LevelHistory(kind, level.index, level.shape)
            history.append(record)
            run_adam(
                list(affine.parameters()),
                lambda level=level: objective(level, affine.matrix(), None),
                affine_steps[level.index],
                rate * _mean(level.step),
                record,
            )
    matrix = initial_matrix if affine is None else affine.matrix().detach()
    correlation = None
    if auto and deformable:
        loss, correlation = _choose_deformable_loss(pyramid, matrix)
        if loss in defer_losses:
            return _composed_result(shape, device, matrix, None, history, start, loss, correlation)
        for level in pyramid:
            level.loss = level_loss(
                loss, terms_of(loss, weights), terms_of(loss, loss_options), windows[level.index]
            )

    # Deformable stage.
    local_full = None
    exact_gradient = None
    if transform == "svf":
        exact_gradient = _exact_svf_gradient(exact_svf_gradient, loss)
    if deformable and overlap is not None:  # ... the deformable one also the warped moving one
        for level in pyramid:
            level.moving_mask = downsample(moving_fg, level.shape)
    if deformable and mind_sampling:
        _use_sampled_mind(pyramid, matrix, loss, weights, loss_options)
    if deformable:
        rate = DEFAULT_LR[transform] if lr is None else lr
        carried = None  # the optimised update, passed from level to level
        bspline = None
        if transform == "bspline":
            grid_shape = control_grid_shape(shape, control_spacing)
            bspline = BSplineField(torch.zeros(1, ndim, *grid_shape, device=device))
        for level in pyramid:
            initial = None if initial_ddf is None else resize_ddf(initial_ddf, level.shape)
            field_shape = velocity_shape(level.shape) if transform == "svf" else level.shape
            if carried is None:
                carried = torch.zeros(1, ndim, *field_shape, device=device)
            carried = resize_ddf(carried, field_shape)
            if bspline is not None:
                params = list(bspline.parameters())
                level_rate = rate * _mean(level.step)

                def local_field(level=level, initial=initial):
                    return after(initial, bspline(level.shape, level.step))
            else:
                dense = DenseField(
                    carried,
                    smoothing,
                    transform == "svf",
                    level.shape,
                    integration_steps,
                    exact_gradient,
                )
                params, level_rate = list(dense.parameters()), rate

                def local_field(dense=dense, initial=initial):
                    if transform == "ddf" and initial is not None:
                        return initial + dense()
                    return after(initial, dense())

            # The sampled similarity reads a dense field on its own grid (an SVF's exponential
            # on the velocity grid), so it is neither upsampled nor regularised at level size.
            evaluated = local_field
            if level.sampled is not None and bspline is None and initial is None:
                evaluated = dense.displacement
            record = LevelHistory(transform, level.index, level.shape)
            history.append(record)
            run_adam(
                params,
                lambda level=level, evaluated=evaluated: objective(level, matrix, evaluated()),
                iterations[level.index],
                level_rate,
                record,
            )
            if level.sampled is not None and level.index == levels - 1 and polish_iterations:
                level.sampled, level.loss = None, level.dense_loss
                record = LevelHistory("polish", level.index, level.shape)
                history.append(record)
                run_adam(
                    params,
                    lambda level=level, local_field=local_field: objective(
                        level, matrix, local_field()
                    ),
                    polish_iterations,
                    level_rate / 2,
                    record,
                )
            with torch.no_grad():
                if bspline is None:
                    carried = dense.field().detach()
                if level.index == levels - 1:
                    local_full = local_field().detach()
    return _composed_result(
        shape,
        device,
        matrix,
        local_full,
        history,
        start,
        loss if deformable else None,
        correlation,
        exact_gradient,
    )


@torch.no_grad()
def _composed_result(
    shape: Sequence[int],
    device: torch.device,
    matrix: torch.Tensor | None,
    local: torch.Tensor | None,
    history: list[LevelHistory],
    start: float,
    loss: str | None,
    correlation: float | None,
    exact_gradient: bool | None = None,
) -> RegistrationResult:
    """The result of :func:`register` begun at ``start`` (``time.perf_counter``): the total
    displacement ``x -> A (x + v(x))`` of ``matrix`` ``A`` and ``local`` ``v`` (either may be
    ``None``) on the grid of ``shape``, with the other fields as given."""
    grid = identity_grid(shape, device, torch.float32)
    points = grid if local is None else grid + local
    if matrix is not None:
        points = apply_affine(matrix, points)
    return RegistrationResult(
        ddf=points - grid,
        matrix=matrix,
        local_ddf=local,
        history=history,
        seconds=time.perf_counter() - start,
        loss=loss,
        contrast_correlation=correlation,
        exact_svf_gradient=exact_gradient,
    )


def _exact_svf_gradient(setting: bool | str, loss: str | None) -> bool:
    """Whether the SVF is differentiated through scaling and squaring: ``setting``, or with
    ``"auto"`` whether ``loss`` holds a term of :data:`EXACT_SVF_GRADIENT_TERMS`."""
    if setting != AUTO:
        return bool(setting)
    return bool(loss) and any(term in EXACT_SVF_GRADIENT_TERMS for term in parse_spec(loss))


def _choose_deformable_loss(
    pyramid: Sequence[Level], matrix: torch.Tensor | None
) -> tuple[str, float]:
    """``loss="auto"``: the loss :func:`regnet.optimize.contrast.choose_loss` picks from the local
    correlation of the fixed image and the moving image aligned by ``matrix``, on the level
    below the finest (the finest with one level), over both foregrounds eroded by one voxel:
    partial-volume voxels at the object's edge pair bright with dark whatever the contrast, and
    on a 16^3 level of a 32^3 head phantom moved the correlation of an inverted contrast from
    -0.98 to -0.21."""
    level = pyramid[-2] if len(pyramid) > 1 else pyramid[-1]
    radius = [1] * len(level.shape)
    regions = [
        1.0 - dilate(1.0 - foreground_mask(image, 0), radius)
        for image in (level.fixed, level.moving)
    ]
    level_matrix = None if matrix is None else level.level_matrix(matrix)
    correlation = local_correlation(level.fixed, level.moving, level_matrix, *regions)
    return choose_loss(correlation), correlation


def _use_sampled_mind(
    pyramid: Sequence[Level],
    matrix: torch.Tensor | None,
    loss: str | None,
    weights: Mapping[str, float] | None,
    options: Mapping[str, Mapping[str, Any]] | None,
) -> None:
    """Give every level a :class:`SampledMIND` in place of the ``mind`` term of ``loss``,
    ``level.loss`` keeping the other terms (``level.dense_loss`` all of them); nothing changes
    unless ``loss`` holds ``mind`` and its other terms need only the field."""
    names = [name.strip() for name in (loss or "").split("+") if name.strip()]
    if "mind" not in names:
        return
    rest = "+".join(name for name in names if name != "mind")
    rest_loss = level_loss(rest, terms_of(rest, weights), terms_of(rest, options), 7)
    if rest_loss is not None and set(rest_loss.requires) != {"ddf"}:
        return
    mind_options = dict((options or {}).get("mind", {}))
    weight = float((weights or {}).get("mind", DEFAULT_WEIGHTS["mind"]))
    for level in pyramid:
        level.sampled = SampledMIND(
            level.fixed,
            level.moving,
            level.fixed_mask,
            level.moving_mask,
            None if matrix is None else level.level_matrix(matrix),
            **mind_options,
        )
        level.sampled_weight = weight
        level.dense_loss, level.loss = level.loss, rest_loss


def _pooled(loss: str | None) -> bool:
    names = [name.strip() for name in (loss or "").split("+") if name.strip()]
    return bool(names) and all(name in POOLED_TERMS for name in names)


def _use_sampled_pooled(pyramid: Sequence[Level], steps: Sequence[int]) -> None:
    """Evaluate the affine pre-stage's pooled similarity at lattice voxels on the levels that
    run ``steps``, where each lattice offset holds about :data:`MIN_LATTICE_SAMPLES` weighted
    voxels or more and no moving-side mask has to be warped (the start search, before it, sees
    every voxel)."""
    for level, count in zip(pyramid, steps, strict=True):
        if not count or level.moving_mask is not None:
            continue
        mask = level.fixed_mask
        weighted = level.fixed[0, 0].numel() if mask is None else int((mask > 0).sum())
        if weighted >= MIN_LATTICE_SAMPLES * 2 ** len(level.shape):
            level.affine_sampled = SampledPooled(level.fixed, level.moving, mask, level.affine_loss)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _default_iterations(
    transform: str, levels: int, spacing: Sequence[float] | None = None
) -> tuple[int, ...]:
    """:data:`DEFAULT_ITERATIONS` for ``levels`` levels (extra coarse levels repeat the first);
    for ``svf`` on a grid finer than 2 mm (``spacing`` in mm per axis) the finest level takes
    :data:`FINE_GRID_FINEST_SVF_ITERATIONS`."""
    base = DEFAULT_ITERATIONS[transform]
    if levels <= len(base):
        steps = base[len(base) - levels :]
    else:
        steps = (base[0],) * (levels - len(base)) + base
    if transform == "svf" and spacing is not None and min(spacing) < 2.0 - 1e-6:
        steps = (*steps[:-1], FINE_GRID_FINEST_SVF_ITERATIONS)
    return steps


def prestage_iterations(kind: str, levels: int) -> tuple[int, ...]:
    """Affine pre-stage of a deformable registration: half the defaults, without the finest
    level, the most expensive one, whose detail the deformable stage refines anyway (50 / 30 / 0
    for three levels). On the real-scan benchmark at 2 mm (``docs/benchmarks.md``, "Real
    scans"), against 100 / 60 / 0 in one run: 0.55x instead of 0.60x SyN's registration time,
    end-point error -0.004..+0.007 mm and Dice -0.002..+0.001 over the 8 scenarios."""
    steps = _default_iterations(kind, levels)
    if levels == 1:
        return steps
    return (*(max(1, count // 2) for count in steps[:-1]), 0)


def refine(
    model_ddf: torch.Tensor,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    steps: int = 10,
    loss: str = "lncc+grad",
    weights: Mapping[str, float] | None = None,
    lr: float | None = None,
    *,
    transform: str = "svf",
    levels: int = 2,
    fixed_mask: torch.Tensor | None = None,
    loss_options: Mapping[str, Mapping[str, Any]] | None = None,
    window: int = 7,
    smoothing: float = 1.0,
) -> torch.Tensor:
    """Instance optimisation: refine a network's DDF on one pair, ``steps`` Adam steps per level.

    ``transform="svf"`` (default) optimises a stationary velocity field ``v`` on its
    half-resolution grid and composes its exponential before the network's field,
    ``x -> x + u_net(x + exp(v)(x))``: the update is diffeomorphic, so refinement adds next to no
    folding to the network's. ``"ddf"`` adds a Gaussian-smoothed dense update instead
    (``u = u_net + G_smoothing * p``), which folds more. Both run on a ``levels``-level pyramid
    (finest: the input grid) with no affine stage. On the 4 demo pairs at 2 mm
    (``docs/benchmarks.md``) 10 steps on 2 levels lift a network's Dice 0.367 -> 0.458 with
    ``svf`` (0.004 % folded voxels, SDlogJ 0.28) and to 0.462 with ``ddf`` (0.444 %, 1.39).

    Args:
        model_ddf: ``(1, ndim, *S)`` starting DDF, voxels of the fixed grid (backward).
        fixed, moving: ``(1, C, *S)`` images on that grid.
        steps: Adam steps on each pyramid level (0 returns ``model_ddf`` unchanged).
        loss, weights, loss_options: loss spec, weight and keyword arguments per term.
        lr: Adam learning rate in voxels (default :data:`DEFAULT_LR` of ``transform``).
        transform: ``"svf"`` or ``"ddf"``.
        levels: pyramid levels, each twice as coarse as the next.
        fixed_mask: optional ``(1, 1, *S)`` mask restricting the similarity.
        window: LNCC window (voxels).
        smoothing: Gaussian sigma (field-grid voxels) applied to the update parameters.

    Returns:
        The refined DDF ``(1, ndim, *S)`` on ``model_ddf``'s device, detached.
    """
    if steps < 0:
        raise ValueError(f"refine steps must be >= 0, got {steps}")
    if transform not in REFINE_TRANSFORMS:
        raise ValueError(f"refine transform must be one of {REFINE_TRANSFORMS}, got {transform!r}")
    if steps == 0:
        return model_ddf.detach()
    result = register(
        fixed,
        moving,
        transform=transform,
        loss=loss,
        weights=weights,
        levels=levels,
        iterations=(steps,) * levels,
        lr=lr,
        fixed_mask=fixed_mask,
        init="identity",
        affine_first=False,
        initial_ddf=model_ddf,
        windows=(window,) * levels,
        loss_options=loss_options,
        smoothing=smoothing,
        device=model_ddf.device,
    )
    return result.ddf
