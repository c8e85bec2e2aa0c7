"""Registration overview panels a person can read: tensors -> one RGB figure (no Lightning, no
files).

Inputs follow :mod:`regnet.spatial`: images ``(C, *S)`` and a backward DDF ``(ndim, *S)`` in
voxels of the fixed grid (array axes), without batch axis, and the fixed grid's voxel -> RAS mm
``affine`` (``(ndim + 1, ndim + 1)``, or ``(4, 4)`` for a 2D slice placed in 3D with its normal
as third column; ``None``: the array axes are taken as R, A, S). The output is a float RGB image
``(3, H, W)`` in ``[0, 1]`` (:attr:`Panel.image`), as ``SummaryWriter.add_image`` and
:func:`regnet.outputs.save_image` take it. What the figure shows:

* **Orientation.** Every volume is reoriented to the nearest RAS axes of the affine
  (``nibabel.orientations.io_orientation``) before it is sliced, so a file stored LAS, LPS or
  RAS gives the same figure. 3D: one row per plane, axial (across S), coronal (across A) and
  sagittal (across R), through the middle of the fixed grid; 2D: the image's own plane. Axial
  and coronal tiles follow the ``radiological`` convention (patient's left on the image's right,
  as radiology viewers show it) or the ``neurological`` one (left on the left); sagittal tiles
  show anterior on the left. The header line states the convention and each row's first tile has
  its R/L, A/P, S/I marks on its four sides.
* **Pixels** are square in mm: each slice is resampled (bilinear, anti-aliased) so that the
  largest extent of the fixed grid spans ``tile_size`` pixels.
* **Intensities.** Each image is windowed on its own 1st-99th percentiles (the warped image on
  the moving image's window: it is the moving scan), so scans with different intensity ranges
  (a 0-255 one and a 0-8000 one) both show, and scaling an image changes nothing.
* **Tiles** (:data:`PANEL_TILES`, titled above the first row): fixed, moving, warped, the
  absolute differences of the windowed fixed image and the windowed moving / warped ones, a
  fixed/warped checkerboard, the deformed grid, and the Jacobian determinant with its colour bar
  at the right end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from regnet.spatial import jacobian_determinant, sample, warp

FOLD_COLOUR = (0.0, 0.0, 0.0)
"""RGB of voxels with ``det J <= 0`` (folding) in :func:`jacobian_image`."""

PANEL_TILES = (
    "fixed",
    "moving",
    "warped",
    "|fixed - moving|",
    "|fixed - warped|",
    "checkerboard",
    "deformed grid",
    "det J",
)
"""Tile titles, left to right, in every row of :func:`make_panel`."""

CONVENTIONS = ("radiological", "neurological")
WINDOW_PERCENTILES = (1.0, 99.0)
PLANES = {2: "axial", 1: "coronal", 0: "sagittal"}
"""Plane name by the RAS axis it cuts across; 3D rows in this order."""

_BACKGROUND = 1.0  # white figure, black text
_FRAME = 0.6  # grey line around each tile (a white det J tile stays visible)
_ROW_GAP = 6
_FONT_SIZE = 12
_LABEL_WIDTH = 92  # row names and slice positions
_MARK_LANE = 14  # room for an orientation letter beside a tile
_TITLE_HEIGHT = 18
_BAR_WIDTH = 14  # colour bar
_BAR_LABELS = 56


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
    spacing = _grid_spacing(spatial) if spacing is None else int(spacing)
    if spacing < 1:
        raise ValueError(f"grid_image: spacing must be >= 1, got {spacing}")
    axes = tuple(range(ndim)) if axes is None else axes
    field = ddf.float()
    return warp(_line_pattern(field, spacing, axes)[None, None], field[None])[0]


def _grid_spacing(spatial: tuple[int, ...]) -> int:
    """:func:`grid_image`'s default voxels between lines."""
    return max(2, min(spatial) // 8)


def _line_pattern(field: torch.Tensor, spacing: int, axes: tuple[int, ...]) -> torch.Tensor:
    """``(*S)`` of field ``(ndim, *S)``'s grid, in its dtype: 1 on voxels whose index along one
    of ``axes`` is a multiple of ``spacing``, else 0."""
    spatial = tuple(field.shape[1:])
    pattern = torch.zeros(spatial, dtype=field.dtype, device=field.device)
    for axis in axes:
        on_line = torch.arange(spatial[axis], device=field.device) % spacing == 0
        shape = [1] * len(spatial)
        shape[axis] = spatial[axis]
        pattern = torch.maximum(pattern, on_line.view(shape).to(field.dtype))
    return pattern


def _grid_plane(field: torch.Tensor, across: int, index: int) -> torch.Tensor:
    """``grid_image(field, axes=<the other two>)`` of a 3D field ``(3, *S)``, evaluated only on
    slice ``index`` across axis ``across`` and returned as ``(1, *S)`` with that one slice
    filled (the values :func:`grid_image` gives there; the panel shows nothing else)."""
    spatial = tuple(field.shape[1:])
    in_plane = tuple(a for a in range(3) if a != across)
    pattern = _line_pattern(field, _grid_spacing(spatial), in_plane)
    axes = [torch.arange(n, dtype=field.dtype, device=field.device) for n in spatial]
    axes[across] = axes[across][index : index + 1]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    plane = field.narrow(across + 1, index, 1)
    values = sample(pattern[None, None], (identity + plane)[None])[0]
    out = torch.zeros((1, *spatial), dtype=field.dtype, device=field.device)
    out.narrow(across + 1, index, 1).copy_(values)
    return out


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


def intensity_window(
    image: torch.Tensor, percentiles: tuple[float, float] = WINDOW_PERCENTILES
) -> tuple[float, float]:
    """``(low, high)``: the ``percentiles`` of the first channel of ``(C, *S)``; the minimum and
    maximum where those coincide (a mostly constant image)."""
    values = image[0].detach().float().cpu().numpy().ravel()
    low, high = np.percentile(values, percentiles)
    if high <= low:
        low, high = values.min(), values.max()
    return float(low), float(high)


def _windowed(image: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """First channel of ``(C, *S)`` mapped from ``window`` to ``[0, 1]``, ``(1, *S)`` float32."""
    low, high = window
    return ((image[:1].float() - low) / max(high - low, 1e-12)).clamp(0.0, 1.0)


def _affine_3d(affine: torch.Tensor | np.ndarray | None, ndim: int) -> np.ndarray:
    """``(4, 4)`` voxel -> RAS affine of the grid seen as 3D (a 2D grid one voxel thick)."""
    if affine is None:
        return np.eye(4)
    matrix = np.asarray(torch.as_tensor(affine).detach().cpu(), np.float64)
    if matrix.shape == (3, 3) and ndim == 2:  # a 2D grid in the plane z = 0
        full = np.eye(4)
        full[np.ix_([0, 1, 3], [0, 1, 3])] = matrix
        return full
    if matrix.shape != (4, 4):
        raise ValueError(f"make_panel: affine must be (4, 4) or (3, 3) for 2D, got {matrix.shape}")
    return matrix


@dataclass(frozen=True)
class _Orientation:
    """Array axes -> RAS axes of a 3D grid: ``ras_axis[a]`` and ``sign[a]`` (``-1``: flipped)
    per array axis, the RAS-ordered ``affine`` and ``spacing`` (mm)."""

    ras_axis: tuple[int, int, int]
    sign: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]

    @classmethod
    def of(cls, affine: np.ndarray, shape: tuple[int, int, int]) -> _Orientation:
        ornt = nib.orientations.io_orientation(affine)
        ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
        spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)
        return cls(
            tuple(int(a) for a in ornt[:, 0]),
            tuple(int(s) for s in ornt[:, 1]),
            ras_affine,
            tuple(float(s) for s in spacing),
        )

    def volume(self, volume: torch.Tensor) -> torch.Tensor:
        """``(C, I, J, K)`` in array axes -> ``(C, X, Y, Z)`` in RAS axes."""
        flips = [a + 1 for a in range(3) if self.sign[a] < 0]
        volume = volume.flip(flips) if flips else volume
        order = [self.ras_axis.index(r) for r in range(3)]
        return volume.permute(0, *(a + 1 for a in order))

    def field(self, ddf: torch.Tensor) -> torch.Tensor:
        """Voxel DDF ``(3, I, J, K)`` in array axes -> ``(3, X, Y, Z)``, RAS axes and components."""
        signs = torch.tensor(self.sign, dtype=ddf.dtype, device=ddf.device).view(3, 1, 1, 1)
        order = [self.ras_axis.index(r) for r in range(3)]
        return self.volume((ddf * signs)[order])


@dataclass(frozen=True)
class Panel:
    """A rendered overview: ``image`` ``(3, H, W)`` in ``[0, 1]``; ``tiles`` maps ``(plane,
    title)`` to the tile's pixel box ``(top, left, height, width)``; ``marks`` maps ``(plane,
    letter)`` to the centre ``(y, x)`` of an orientation letter beside the plane's fixed tile."""

    image: torch.Tensor
    tiles: dict[tuple[str, str], tuple[int, int, int, int]] = field(default_factory=dict)
    marks: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)


def _marks(plane: str, convention: str) -> dict[str, str]:
    """Letters on the left, right, top and bottom side of a displayed plane."""
    if plane == "sagittal":
        return {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    left, right = ("R", "L") if convention == "radiological" else ("L", "R")
    top, bottom = ("A", "P") if plane == "axial" else ("S", "I")
    return {"left": left, "right": right, "top": top, "bottom": bottom}


def _display(plane_slice: torch.Tensor, plane: str, convention: str) -> torch.Tensor:
    """A slice ``(C, P, Q)`` over two RAS axes (``P`` before ``Q``) -> ``(C, rows, columns)`` as
    drawn: the later axis upwards (A or S at the top), the earlier one across (R on the left in
    the radiological convention, L in the neurological one; A on the left in sagittal planes)."""
    tile = plane_slice.transpose(-1, -2).flip(-2)
    if plane == "sagittal" or convention == "radiological":
        tile = tile.flip(-1)
    return tile


def _resize(tile: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(C, h, w)`` -> ``(C, height, width)``, bilinear (anti-aliased where it shrinks)."""
    if tuple(tile.shape[-2:]) == (height, width):
        return tile.float()
    batch = tile[None].float()
    return F.interpolate(batch, size=(height, width), mode="bilinear", antialias=True)[0]


def _show(
    volume: torch.Tensor,
    across: int,
    index: int,
    plane: str,
    convention: str,
    height: int,
    width: int,
) -> torch.Tensor:
    """Slice ``index`` across RAS axis ``across`` of ``(C, X, Y, Z)``, as drawn, at the tile's
    pixel size."""
    return _resize(_display(volume.select(across + 1, index), plane, convention), height, width)


def make_panel(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    warped: torch.Tensor,
    ddf: torch.Tensor,
    affine: torch.Tensor | np.ndarray | None = None,
    convention: str = "radiological",
    tile_size: int = 160,
    det: torch.Tensor | None = None,
) -> Panel:
    """Draw the overview of one registered pair (see the module docstring): the RGB image
    ``(3, H, W)`` in ``[0, 1]`` (:attr:`Panel.image`) and where its tiles and marks lie.

    Args:
        fixed, moving, warped: ``(C, *S)`` images on the fixed grid; the first channel is shown.
        ddf: ``(ndim, *S)`` the backward field that produced ``warped``, voxels of the array axes.
        affine: the fixed grid's voxel -> RAS mm affine (``None``: array axes are R, A, S).
        convention: ``"radiological"`` or ``"neurological"``, for axial and coronal tiles.
        tile_size: pixels spanned by the largest extent (mm) of the fixed grid.
        det: ``(*S)`` Jacobian determinant of the transform on the same grid, array axes, when
            the caller has it (registration results do); ``None``: computed from ``ddf``.
    """
    ndim = ddf.shape[0]
    spatial = tuple(ddf.shape[1:])
    if ndim not in (2, 3) or len(spatial) != ndim:
        raise ValueError(f"make_panel: ddf must be (ndim, *S) with ndim 2 or 3, got {ddf.shape}")
    for name, image in (("fixed", fixed), ("moving", moving), ("warped", warped)):
        if image.dim() != ndim + 1 or tuple(image.shape[1:]) != spatial:
            raise ValueError(
                f"make_panel: {name} must have shape (C, {', '.join(map(str, spatial))}) "
                f"to match ddf {tuple(ddf.shape)}, got {tuple(image.shape)}"
            )
    if convention not in CONVENTIONS:
        raise ValueError(f"make_panel: convention must be one of {CONVENTIONS}, got {convention!r}")
    fixed_window, moving_window = intensity_window(fixed), intensity_window(moving)
    images = [
        _windowed(fixed, fixed_window),
        _windowed(moving, moving_window),
        _windowed(warped, moving_window),
    ]
    field3 = ddf.detach().float()
    if ndim == 2:  # a 3D grid one voxel thick, no displacement across it
        images = [image[..., None] for image in images]
        field3 = torch.cat((field3, torch.zeros_like(field3[:1])))[..., None]
    shape3 = tuple(images[0].shape[1:])
    orientation = _Orientation.of(_affine_3d(affine, ndim), shape3)
    images = [orientation.volume(image) for image in images]
    field3 = orientation.field(field3)
    if det is not None:
        if tuple(det.shape) != spatial:
            raise ValueError(
                f"make_panel: det must have shape {spatial} to match ddf, got {tuple(det.shape)}"
            )
        det = det.detach().float()
        det = orientation.volume((det[..., None] if ndim == 2 else det)[None])[0]
    if ndim == 2:
        across = orientation.ras_axis[2]  # the RAS axis the slice's thin axis became
        in_plane = [r for r in range(3) if r != across]
        field2 = field3[in_plane].squeeze(across + 1)
        if det is None:
            det = jacobian_determinant(field2[None])[0].unsqueeze(across)
        grids = {across: grid_image(field2).unsqueeze(across + 1)}
        planes = [across]
    else:
        if det is None:
            det = jacobian_determinant(field3[None])[0]
        planes = list(PLANES)
        grids = {r: _grid_plane(field3, r, field3.shape[r + 1] // 2) for r in planes}
    ras_shape = images[0].shape[1:]
    extents = [n * s for n, s in zip(ras_shape, orientation.spacing, strict=True)]
    pixel_mm = max(extents) / tile_size
    rows = []
    for across in planes:
        index = ras_shape[across] // 2
        plane = PLANES[across]
        axes = [r for r in range(3) if r != across]
        height = max(1, round(extents[axes[1]] / pixel_mm))
        width = max(1, round(extents[axes[0]] / pixel_mm))

        view = (across, index, plane, convention, height, width)
        f, m, w = (_show(image, *view) for image in images)
        tiles = [
            f,
            m,
            w,
            (f - m).abs(),
            (f - w).abs(),
            checkerboard(f, w),
            _show(grids[across], *view),
            jacobian_image(_show(det[None], *view)[0]),
        ]
        centre = [(n - 1) / 2 for n in ras_shape]
        centre[across] = index
        position = (orientation.affine @ [*centre, 1.0])[across]
        label = [plane] if affine is None else [plane, f"{'xyz'[across]} = {position:.1f} mm"]
        rows.append((plane, label, [t.expand(3, -1, -1).cpu() for t in tiles]))
    return _compose(rows, convention, affine is None)


def _compose(rows: list, convention: str, no_affine: bool) -> Panel:
    """Lay out titled rows of tiles with orientation marks, a header and the colour bar."""
    cell_h = max(t.shape[1] for _, _, tiles in rows for t in tiles)
    cell_w = max(t.shape[2] for _, _, tiles in rows for t in tiles)
    columns = len(PANEL_TILES)
    left0 = _LABEL_WIDTH + _MARK_LANE
    pitch_x = cell_w + _MARK_LANE
    pitch_y = cell_h + 2 * _MARK_LANE + _ROW_GAP
    top0 = 2 * _TITLE_HEIGHT  # header line, then the tile titles
    width = left0 + columns * pitch_x + _BAR_WIDTH + _BAR_LABELS + _MARK_LANE
    height = top0 + len(rows) * pitch_y + _MARK_LANE // 2
    canvas = torch.full((3, height, width), _BACKGROUND)
    text = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(text)
    font = ImageFont.load_default(size=_FONT_SIZE)
    panel = Panel(canvas)

    def write(x: float, y: float, words: str, anchor: str = "mm") -> None:
        draw.text((round(x), round(y)), words, fill=255, font=font, anchor=anchor)

    side = "right" if convention == "radiological" else "left"
    axes = "no affine: array axes shown as R, A, S" if no_affine else "reoriented to RAS"
    header = (
        f"{convention} convention: patient's left on the image's {side}   |   {axes}   |   "
        "each image windowed on its own 1st-99th percentiles (warped: the moving window)"
    )
    write(_MARK_LANE, _TITLE_HEIGHT / 2, header, anchor="lm")
    for column, title in enumerate(PANEL_TILES):
        write(left0 + column * pitch_x + cell_w / 2, 1.5 * _TITLE_HEIGHT, title)
    for row, (plane, label, tiles) in enumerate(rows):
        cell_top = top0 + row * pitch_y + _MARK_LANE
        for line, words in enumerate(label):
            write(4, cell_top + cell_h / 2 + (line - (len(label) - 1) / 2) * 16, words, "lm")
        for column, tile in enumerate(tiles):
            tile_h, tile_w = tile.shape[1:]
            top = cell_top + (cell_h - tile_h) // 2
            left = left0 + column * pitch_x + (cell_w - tile_w) // 2
            canvas[:, top - 1 : top + tile_h + 1, left - 1 : left + tile_w + 1] = _FRAME
            canvas[:, top : top + tile_h, left : left + tile_w] = tile
            panel.tiles[(plane, PANEL_TILES[column])] = (top, left, tile_h, tile_w)
        top, left, tile_h, tile_w = panel.tiles[(plane, PANEL_TILES[0])]
        lane = _MARK_LANE / 2
        places = {
            "left": (top + tile_h / 2, left - lane),
            "right": (top + tile_h / 2, left + tile_w + lane),
            "top": (top - lane, left + tile_w / 2),
            "bottom": (top + tile_h + lane, left + tile_w / 2),
        }
        for where, letter in _marks(plane, convention).items():
            y, x = places[where]
            write(x, y, letter)
            panel.marks[(plane, letter)] = (round(y), round(x))
    _colour_bar(canvas, write, left0 + columns * pitch_x, top0 + _MARK_LANE, cell_h)
    alpha = torch.from_numpy(np.asarray(text, np.float32) / 255.0)
    canvas.mul_(1.0 - alpha)  # black text
    return panel


def _colour_bar(canvas: torch.Tensor, write, left: int, top: int, height: int) -> None:
    """The det J colours from 2 (top) to 1/2 on a log scale, then the folding swatch."""
    swatch = max(6, height // 8)
    bar = max(8, height - swatch - 6)
    det = torch.logspace(1.0, -1.0, bar, base=2.0)
    colours = jacobian_image(det)[:, :, None].expand(3, bar, _BAR_WIDTH)
    canvas[:, top : top + bar, left : left + _BAR_WIDTH] = colours
    fold_top = top + bar + 6
    fold = torch.tensor(FOLD_COLOUR).view(3, 1, 1)
    canvas[:, fold_top : fold_top + swatch, left : left + _BAR_WIDTH] = fold
    labels_x = left + _BAR_WIDTH + 4
    for value, y in (("2", top), ("1", top + bar / 2), ("1/2", top + bar)):
        write(labels_x, y, value, "lm")
    write(labels_x, fold_top + swatch / 2, "<= 0", "lm")
