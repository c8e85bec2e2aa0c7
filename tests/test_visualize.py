import math

import numpy as np
import pytest
import torch

from regnet.spatial import jacobian_determinant
from regnet.visualize import (
    FOLD_COLOUR,
    PANEL_TILES,
    _grid_plane,
    checkerboard,
    grid_image,
    intensity_window,
    jacobian_image,
    make_panel,
)


@pytest.mark.parametrize(
    ("shape", "tiles"), [((8, 8), 4), ((7, 5), 2), ((6, 4, 5), 3)], ids=["2d", "uneven", "3d"]
)
def test_checkerboard_matches_square_parity(shape, tiles):
    a = torch.zeros(1, *shape)
    b = torch.ones(1, *shape)
    out = checkerboard(a, b, tiles=tiles)
    sizes = [math.ceil(n / tiles) for n in shape]
    index = np.indices(shape)
    expected = sum(index[d] // sizes[d] for d in range(len(shape))) % 2
    np.testing.assert_array_equal(out[0].numpy(), expected)


def test_checkerboard_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        checkerboard(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5))


def test_grid_image_identity_is_line_pattern():
    out = grid_image(torch.zeros(2, 16, 12), spacing=4)
    i, j = np.indices((16, 12))
    expected = ((i % 4 == 0) | (j % 4 == 0)).astype(np.float32)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_grid_image_follows_backward_mapping():
    # u = +1 along axis 0: out(x) = pattern(x + e0), so horizontal lines move to i = 3, 7, 11.
    ddf = torch.zeros(2, 16, 12)
    ddf[0] = 1.0
    out = grid_image(ddf, spacing=4, axes=(0,))
    rows = out[0, :15].amax(dim=1).numpy()  # the last row samples outside (border value)
    np.testing.assert_array_equal(np.flatnonzero(rows > 1e-5), [3, 7, 11])
    torch.testing.assert_close(out[0, 3], torch.ones(12))


@pytest.mark.parametrize("across", [0, 1, 2])
def test_grid_plane_is_the_slice_of_the_full_grid_image(across):
    field = wavy_field((11, 13, 9)) * 1.5
    index = field.shape[across + 1] // 2
    in_plane = tuple(a for a in range(3) if a != across)
    full = grid_image(field, axes=in_plane)
    plane = _grid_plane(field, across, index)
    torch.testing.assert_close(
        plane.select(across + 1, index), full.select(across + 1, index), atol=1e-6, rtol=0
    )
    plane.select(across + 1, index).zero_()
    assert not plane.any()  # nothing drawn off the slice


@pytest.mark.parametrize("ndim", [2, 3])
def test_panel_with_the_callers_determinant_is_the_panel_it_computes(ndim):
    fixed, affine = head()
    if ndim == 2:
        fixed, affine = fixed[..., 8], affine[np.ix_([0, 1, 3], [0, 1, 3])]
    moving = fixed.roll(2, dims=1)
    field = wavy_field((*fixed.shape[1:], 1)[:3])[:ndim]
    field = field[..., 0] if ndim == 2 else field
    det = jacobian_determinant(field[None].double())[0]
    computed = make_panel(fixed, moving, moving, field, affine).image
    given = make_panel(fixed, moving, moving, field, affine, det=det).image
    torch.testing.assert_close(given, computed, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="det must have shape"):
        make_panel(fixed, moving, moving, field, affine, det=det[:-1])


def test_jacobian_image_colours():
    det = torch.tensor([1.0, 0.5, 2.0, math.sqrt(2.0), 0.0, -0.3, 8.0])
    rgb = jacobian_image(det).T  # (N, 3)
    expected = [
        (1, 1, 1),  # volume kept: white
        (0, 0, 1),  # compression to half: blue
        (1, 0, 0),  # doubling: red
        (1, 0.5, 0.5),  # log2 det = 1/2
        FOLD_COLOUR,
        FOLD_COLOUR,
        (1, 0, 0),  # saturates
    ]
    torch.testing.assert_close(rgb, torch.tensor(expected, dtype=torch.float32))


def tile(panel, plane: str, title: str) -> torch.Tensor:
    top, left, height, width = panel.tiles[(plane, title)]
    return panel.image[:, top : top + height, left : left + width]


def head(shape=(20, 24, 16), blob=(-5.0, 0.0, 0.0)) -> tuple[torch.Tensor, np.ndarray]:
    """A textured ellipsoid with a bright blob at ``blob`` (RAS mm), on a RAS grid of 1 x 1 x 2
    mm centred on the origin: ``(1, *shape)`` and its affine."""
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * [1.0, 1.0, 2.0]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    x, y, z = np.moveaxis(index @ affine[:3, :3].T + affine[:3, 3], -1, 0)
    inside = (x / 9) ** 2 + (y / 11) ** 2 + (z / 14) ** 2 < 1
    image = inside * (100 + 20 * np.sin(0.7 * x) * np.cos(0.5 * y))
    near = (x - blob[0]) ** 2 + (y - blob[1]) ** 2 + (z - blob[2]) ** 2 < 6
    image = image + 400 * near
    return torch.from_numpy(image.astype(np.float32))[None], affine


def wavy_field(shape) -> torch.Tensor:
    """A smooth field with every component varying along every axis, voxels."""
    axes = torch.meshgrid(*[torch.linspace(0, 3, n) for n in shape], indexing="ij")
    return torch.stack([torch.sin(axes[(c + 1) % 3] + axes[c]) * (c + 1) * 0.6 for c in range(3)])


def flip_x(volume: torch.Tensor, affine: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The same volume stored with the first array axis reversed (RAS -> LAS)."""
    flipped = affine.copy()
    flipped[:, 0] = -affine[:, 0]
    flipped[:3, 3] = affine[:3, :3] @ [volume.shape[1] - 1, 0, 0] + affine[:3, 3]
    return volume.flip(1), flipped


def test_each_image_is_windowed_on_its_own_intensities():
    """A moving scan 1000 times brighter shows exactly as the unscaled one (the shared window of
    before drew it white, or the fixed one black)."""
    fixed, affine = head()
    moving = fixed.roll(2, dims=2)
    ddf = wavy_field(fixed.shape[1:])
    plain = make_panel(fixed, moving, moving, ddf, affine)
    scaled = make_panel(fixed, moving * 1000, moving * 1000, ddf, affine)
    for plane in ("axial", "coronal", "sagittal"):
        for title in ("moving", "warped", "|fixed - moving|", "checkerboard"):
            a, b = tile(plain, plane, title), tile(scaled, plane, title)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
            assert abs(float(b.mean()) - float(a.mean())) < 1e-6
            assert abs(float(b.std()) - float(a.std())) < 1e-6
        shown = tile(scaled, plane, "moving")
        assert 0.1 < float(shown.mean()) < 0.9 and float(shown.std()) > 0.2  # not black, not white
    torch.testing.assert_close(scaled.image, plain.image, atol=1e-5, rtol=0)
    low, high = intensity_window(moving * 1000)
    expected = np.percentile(moving.numpy() * 1000, [1, 99])
    np.testing.assert_allclose([low, high], expected, rtol=1e-6)


def test_las_and_ras_storage_give_the_same_figure():
    fixed, affine = head()
    moving = fixed.roll(3, dims=3)
    ddf = wavy_field(fixed.shape[1:])
    ras = make_panel(fixed, moving, moving, ddf, affine).image
    f_las, affine_las = flip_x(fixed, affine)
    m_las, _ = flip_x(moving, affine)
    ddf_las = ddf.flip(1) * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1, 1)  # x -> -x
    assert torch.equal(make_panel(f_las, m_las, m_las, ddf_las, affine_las).image, ras)
    # axes stored in reverse order (k, j, i) with the affine's columns permuted to match
    order = [2, 1, 0]
    affine_kji = affine.copy()
    affine_kji[:, :3] = affine[:, order]
    f_kji, m_kji = fixed.permute(0, 3, 2, 1), moving.permute(0, 3, 2, 1)
    ddf_kji = ddf[order].permute(0, 3, 2, 1)
    torch.testing.assert_close(
        make_panel(f_kji, m_kji, m_kji, ddf_kji, affine_kji).image, ras, atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("convention", ["radiological", "neurological"])
def test_left_mark_is_on_the_side_of_a_left_hemisphere_blob(convention):
    fixed, affine = head(blob=(-5.0, 0.0, 0.0))  # x < 0: the patient's left
    f_las, affine_las = flip_x(fixed, affine)
    for image, matrix in ((fixed, affine), (f_las, affine_las)):
        panel = make_panel(
            image, image, image, torch.zeros(3, *image.shape[1:]), matrix, convention
        )
        for plane in ("axial", "coronal"):
            top, left, height, width = panel.tiles[(plane, "fixed")]
            shown = tile(panel, plane, "fixed")[0]
            columns = torch.nonzero(shown >= 0.999)[:, 1].float()  # the saturated blob
            blob_side = np.sign(float(columns.mean()) - (width - 1) / 2)
            y, x = panel.marks[(plane, "L")]
            assert np.sign(x - (left + width / 2)) == blob_side
            right_y, right_x = panel.marks[(plane, "R")]
            assert np.sign(right_x - (left + width / 2)) == -blob_side and right_y == y
            # the letter is drawn there: dark pixels on the white margin
            assert float(panel.image[:, y - 5 : y + 6, x - 5 : x + 6].min()) < 0.3
    expected_side = 1 if convention == "radiological" else -1
    assert blob_side == expected_side


def test_axial_tile_shows_the_middle_slice_as_stated():
    """With one voxel per pixel the axial tile is the windowed slice z = middle with A at the
    top and R on the left (radiological)."""
    shape = (6, 8, 10)
    volume = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0)) * 50
    panel = make_panel(volume, volume, volume, torch.zeros(3, *shape), np.eye(4), tile_size=10)
    low, high = intensity_window(volume)
    windowed = ((volume[0, :, :, 5] - low) / (high - low)).clamp(0, 1)  # (x, y)
    expected = windowed.T.flip(0).flip(1)  # rows: y from A (top); columns: x from R (left)
    torch.testing.assert_close(tile(panel, "axial", "fixed")[0], expected)
    sagittal = ((volume[0, 3] - low) / (high - low)).clamp(0, 1)  # (y, z)
    torch.testing.assert_close(tile(panel, "sagittal", "fixed")[0], sagittal.T.flip(0).flip(1))


def test_difference_and_jacobian_tiles():
    fixed, affine = head()
    moving = fixed.roll(2, dims=1)
    panel = make_panel(fixed, moving, fixed, torch.zeros(3, *fixed.shape[1:]), affine)
    for plane in ("axial", "coronal", "sagittal"):
        assert torch.all(tile(panel, plane, "|fixed - warped|") == 0)
        assert float(tile(panel, plane, "|fixed - moving|").max()) > 0.5
        assert torch.all(tile(panel, plane, "det J") == 1)  # identity: white


def test_folding_shows_in_every_plane():
    shape = (6, 8, 10)
    fixed = torch.rand(1, *shape, generator=torch.Generator().manual_seed(1))
    ddf = torch.zeros(3, *shape)
    # x -> x + u: u_0 = -2 i makes d(x+u)_0/di = -1, so det J = -1 everywhere (folded).
    ddf[0] = -2.0 * torch.arange(shape[0], dtype=torch.float32).view(-1, 1, 1)
    panel = make_panel(fixed, fixed, fixed, ddf)
    fold = torch.tensor(FOLD_COLOUR).view(3, 1, 1)
    for plane in ("axial", "coronal", "sagittal"):
        assert torch.all(tile(panel, plane, "det J") == fold)
    assert len({title for _, title in panel.tiles}) == len(PANEL_TILES)


def test_two_dimensional_slices():
    image = torch.rand(1, 12, 10, generator=torch.Generator().manual_seed(2)) * 9
    ddf = torch.zeros(2, 12, 10)
    plain = make_panel(image, image, image, ddf)
    assert [plane for plane, _ in plain.marks] == ["axial"] * 4
    # a coronal slice placed in 3D: columns x and z, normal y
    coronal = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 5.0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    panel = make_panel(image, image, image, ddf, coronal)
    assert sorted(letter for _, letter in panel.marks) == ["I", "L", "R", "S"]
    # a 2D affine with x flipped: the same figure as the array flipped back
    flipped = np.array([[-1.0, 0, 11.0], [0, 1.0, 0], [0, 0, 1]])
    same = make_panel(image.flip(1), image.flip(1), image.flip(1), ddf, flipped).image
    assert torch.equal(same, make_panel(image, image, image, ddf, np.eye(3)).image)


def test_make_panel_rejects_mismatched_input():
    with pytest.raises(ValueError, match="warped must have shape"):
        make_panel(
            torch.rand(1, 8, 8), torch.rand(1, 8, 8), torch.rand(1, 8, 9), torch.zeros(2, 8, 8)
        )
    with pytest.raises(ValueError, match="convention must be one of"):
        make_panel(*[torch.rand(1, 8, 8)] * 3, torch.zeros(2, 8, 8), convention="left")
