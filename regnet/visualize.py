"""Registration overview panels: pure tensor -> image functions (no Lightning, no files).

Inputs follow :mod:`regnet.spatial`: images ``(C, *S)`` and a backward DDF ``(ndim, *S)`` in
voxels of the fixed grid, without batch axis. Outputs are float RGB images ``(3, H, W)`` in
``[0, 1]``, as ``SummaryWriter.add_image`` and :func:`regnet.outputs.save_image` take them.

A panel has one row per viewed plane (one row in 2D; in 3D the middle slices across axis 0, 1
and 2, in that order) and eight tiles per row: fixed, moving, warped, ``|fixed - moving|``,
``|fixed - warped|``, a fixed/warped checkerboard, the deformed grid and the Jacobian
determinant map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from regnet.spatial import jacobian_determinant, warp

FOLD_COLOUR = (0.0, 0.0, 0.0)
"""RGB of voxels with ``det J <= 0`` (folding) in :func:`jacobian_image`."""

PANEL_TILES = (
    "fixed",
    "moving",
    "warped",
    "|fixed-moving|",
    "|fixed-warped|",
    "checkerboard",
    "grid",
    "jacobian",
)
"""Tile order, left to right, in every row of :func:`make_panel`."""

_PANEL_PADDING = 2  # pixels between tiles


def checkerboard(a: torch.Tensor, b: torch.Tensor, tiles: int = 4) -> torch.Tensor:
    """Interleave two images in a checkerboard of ``tiles`` squares per axis.

    Args:
        a, b: ``(C, *S)`` images of the same shape.
        tiles: number of squares along each spatial axis; a square spans ``ceil(n / tiles)``
            voxels of an axis of size ``n``.

    Returns:
        ``(C, *S)``: ``a`` where the sum of the square indices is even, ``b`` where it is odd;
        the square holding voxel ``0`` comes from ``a``.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"checkerboard: images differ in shape, {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    if tiles < 1:
        raise ValueError(f"checkerboard: tiles must be >= 1, got {tiles}")
    spatial = a.shape[1:]
    parity = torch.zeros(spatial, dtype=torch.long, device=a.device)
    for axis, n in enumerate(spatial):
        size = -(-n // tiles)
        index = torch.arange(n, device=a.device) // size
        parity = parity + index.view(*([1] * axis), n, *([1] * (len(spatial) - axis - 1)))
    return torch.where(parity % 2 == 0, a, b)


def grid_image(
    ddf: torch.Tensor, spacing: int | None = None, axes: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Deformed grid: a line pattern pulled back through the transform, ``(1, *S)`` in ``[0, 1]``.

    The pattern is ``1`` on voxels whose index along one of ``axes`` is a multiple of
    ``spacing`` and ``0`` elsewhere; it is warped like the moving image, so the value at fixed
    point ``x`` is ``pattern(x + ddf(x))`` (linear interpolation). A zero field returns the
    pattern itself.

    Args:
        ddf: ``(ndim, *S)`` backward displacement, voxels.
        spacing: voxels between lines; default ``max(2, min(S) // 8)``.
        axes: axes along which lines are spaced (lines are perpendicular to them); default all.
            For a slice across axis ``a`` of a 3D field, leave ``a`` out, so that only in-plane
            lines show.
    """
    ndim = ddf.shape[0]
    spatial = ddf.shape[1:]
    if len(spatial) != ndim:
        raise ValueError(f"grid_image: ddf must have shape (ndim, *S), got {tuple(ddf.shape)}")
    spacing = max(2, min(spatial) // 8) if spacing is None else int(spacing)
    if spacing < 1:
        raise ValueError(f"grid_image: spacing must be >= 1, got {spacing}")
    axes = tuple(range(ndim)) if axes is None else axes
    field = ddf.float()
    pattern = torch.zeros(spatial, dtype=field.dtype, device=field.device)
    for axis in axes:
        on_line = torch.arange(spatial[axis], device=field.device) % spacing == 0
        shape = [1] * ndim
        shape[axis] = spatial[axis]
        pattern = torch.maximum(pattern, on_line.view(shape).to(field.dtype))
    return warp(pattern[None, None], field[None])[0]


def jacobian_image(det: torch.Tensor) -> torch.Tensor:
    """Colour-code a Jacobian determinant map ``(*S)`` as RGB ``(3, *S)`` in ``[0, 1]``.

    ``det = 1`` (volume kept) is white; compression shades to blue and expansion to red,
    symmetric in ``log2 det`` and saturated at ``det = 1/2`` (pure blue) and ``det = 2``
    (pure red); folding (``det <= 0``) is :data:`FOLD_COLOUR`.
    """
    det = det.float()
    level = torch.log2(det.clamp_min(1e-6)).clamp(-1.0, 1.0)
    expand = level.clamp_min(0.0)
    shrink = (-level).clamp_min(0.0)
    rgb = torch.stack((1.0 - shrink, 1.0 - shrink - expand, 1.0 - expand))
    fold = torch.tensor(FOLD_COLOUR, dtype=rgb.dtype, device=rgb.device)
    fold = fold.view(3, *([1] * det.dim())).expand_as(rgb)
    return torch.where(det <= 0, fold, rgb)


def _gray(image: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """First channel of ``(C, *S)`` mapped from ``[low, high]`` to grey RGB ``(3, *S)``."""
    scaled = ((image[0].float() - low) / (high - low).clamp_min(1e-12)).clamp(0.0, 1.0)
    return scaled.expand(3, *scaled.shape)


def _plane(volume: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``(C, *S)`` -> the middle slice across spatial ``axis`` (``None``: 2D, unchanged)."""
    if axis is None:
        return volume
    return volume.select(axis + 1, volume.shape[axis + 1] // 2)


def _pad_to(tile: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.pad(tile, (0, width - tile.shape[2], 0, height - tile.shape[1]))


def tile_grid(
    tiles: torch.Tensor, columns: int, padding: int = 2, pad_value: float = 0.0
) -> torch.Tensor:
    """Lay ``tiles`` ``(N, C, H, W)`` out left to right, ``columns`` per row, ``padding`` pixels
    of ``pad_value`` around and between them: ``(C, rows * (H + padding) + padding,
    columns' * (W + padding) + padding)`` with ``columns' = min(columns, N)``.

    The layout of ``torchvision.utils.make_grid(tiles, nrow=columns, padding, pad_value)`` for
    ``N > 1``, without importing torchvision (seconds, for the command-line tools).
    """
    if tiles.dim() != 4 or tiles.shape[0] < 1 or columns < 1:
        raise ValueError(
            f"tile_grid: expected (N, C, H, W) tiles and columns >= 1, got "
            f"{tuple(tiles.shape)} and {columns}"
        )
    count, channels, height, width = tiles.shape
    columns = min(columns, count)
    rows = -(-count // columns)
    step_y, step_x = height + padding, width + padding
    grid = tiles.new_full(
        (channels, rows * step_y + padding, columns * step_x + padding), pad_value
    )
    for k in range(count):
        top, left = (k // columns) * step_y + padding, (k % columns) * step_x + padding
        grid[:, top : top + height, left : left + width] = tiles[k]
    return grid


def make_panel(
    fixed: torch.Tensor, moving: torch.Tensor, warped: torch.Tensor, ddf: torch.Tensor
) -> torch.Tensor:
    """Overview of one registered pair as an RGB image ``(3, H, W)`` float in ``[0, 1]``.

    Args:
        fixed, moving, warped: ``(C, *S)`` images; the first channel is shown. Fixed, moving
            and warped share one intensity window (min to max of fixed and moving); both
            difference tiles use that window's width, so before/after are comparable.
        ddf: ``(ndim, *S)`` the backward field that produced ``warped``, voxels.

    Tiles and rows are described in the module docstring (:data:`PANEL_TILES`); 3D tiles of
    different plane sizes are zero-padded at the bottom/right to the largest.
    """
    ndim = ddf.shape[0]
    spatial = tuple(ddf.shape[1:])
    for name, image in (("fixed", fixed), ("moving", moving), ("warped", warped)):
        if image.dim() != ndim + 1 or tuple(image.shape[1:]) != spatial:
            raise ValueError(
                f"make_panel: {name} must have shape (C, {', '.join(map(str, spatial))}) "
                f"to match ddf {tuple(ddf.shape)}, got {tuple(image.shape)}"
            )
    low = torch.minimum(fixed[0].min(), moving[0].min()).float()
    high = torch.maximum(fixed[0].max(), moving[0].max()).float()
    width = high - low
    det = jacobian_determinant(ddf[None].float())  # (1, *S)
    zero = torch.zeros((), device=ddf.device)
    rows = []
    for axis in [None] if ndim == 2 else range(3):
        in_plane = tuple(a for a in range(ndim) if a != axis)
        images = [_plane(x, axis) for x in (fixed, moving, warped)]
        f, m, w = (_gray(x, low, high) for x in images)
        rows += [
            f,
            m,
            w,
            _gray((images[0] - images[1]).abs(), zero, width),
            _gray((images[0] - images[2]).abs(), zero, width),
            checkerboard(f, w),
            _plane(grid_image(ddf, axes=in_plane), axis).expand(3, *f.shape[1:]),
            jacobian_image(_plane(det, axis)[0]),
        ]
    height = max(t.shape[1] for t in rows)
    breadth = max(t.shape[2] for t in rows)
    tiles = torch.stack([_pad_to(t.float(), height, breadth) for t in rows])
    return tile_grid(tiles, len(PANEL_TILES), padding=_PANEL_PADDING, pad_value=1.0)
