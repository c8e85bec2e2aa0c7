import math

import numpy as np
import pytest
import torch

from regnet.visualize import (
    FOLD_COLOUR,
    PANEL_TILES,
    checkerboard,
    grid_image,
    jacobian_image,
    make_panel,
    tile_grid,
)

PAD = 2  # make_panel's spacing between tiles


def tile(panel: torch.Tensor, row: int, col: int, height: int, width: int) -> torch.Tensor:
    top = PAD + row * (height + PAD)
    left = PAD + col * (width + PAD)
    return panel[:, top : top + height, left : left + width]


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


def test_make_panel_2d_tiles():
    h, w = 12, 10
    fixed = torch.rand(1, h, w, generator=torch.Generator().manual_seed(0)) * 2 + 1
    moving = fixed.roll(2, dims=1)
    warped = fixed.clone()
    ddf = torch.zeros(2, h, w)
    panel = make_panel(fixed, moving, warped, ddf)
    n = len(PANEL_TILES)
    assert panel.shape == (3, h + 2 * PAD, n * (w + PAD) + PAD)
    low, high = torch.minimum(fixed.min(), moving.min()), torch.maximum(fixed.max(), moving.max())
    norm_fixed = (fixed[0] - low) / (high - low)
    col = {name: k for k, name in enumerate(PANEL_TILES)}
    torch.testing.assert_close(tile(panel, 0, col["fixed"], h, w), norm_fixed.expand(3, h, w))
    torch.testing.assert_close(
        tile(panel, 0, col["|fixed-moving|"], h, w),
        ((fixed[0] - moving[0]).abs() / (high - low)).expand(3, h, w),
    )
    assert torch.all(tile(panel, 0, col["|fixed-warped|"], h, w) == 0)
    assert torch.all(tile(panel, 0, col["jacobian"], h, w) == 1)  # identity: white
    torch.testing.assert_close(tile(panel, 0, col["grid"], h, w), grid_image(ddf).expand(3, h, w))


def test_make_panel_3d_shows_folds_in_every_plane():
    shape = (6, 8, 10)
    fixed = torch.rand(1, *shape, generator=torch.Generator().manual_seed(1))
    ddf = torch.zeros(3, *shape)
    # x -> x + u: u_0 = -2 i makes d(x+u)_0/di = -1, so det J = -1 everywhere (folded).
    ddf[0] = -2.0 * torch.arange(shape[0], dtype=torch.float32).view(-1, 1, 1)
    panel = make_panel(fixed, fixed, fixed, ddf)
    h, w = 8, 10  # largest plane size
    assert panel.shape == (3, 3 * (h + PAD) + PAD, len(PANEL_TILES) * (w + PAD) + PAD)
    fold = torch.tensor(FOLD_COLOUR).view(3, 1, 1)
    col = PANEL_TILES.index("jacobian")
    for row, plane in enumerate([(8, 10), (6, 10), (6, 8)]):
        jac = tile(panel, row, col, h, w)[:, : plane[0], : plane[1]]
        assert torch.all(jac == fold)
    # the plane across axis 0 shows the middle slice of the fixed image
    mid = fixed[0, shape[0] // 2]
    norm = (mid - fixed.min()) / (fixed.max() - fixed.min())
    torch.testing.assert_close(tile(panel, 0, 0, h, w)[0], norm)


def test_make_panel_rejects_mismatched_image():
    with pytest.raises(ValueError, match="warped must have shape"):
        make_panel(
            torch.rand(1, 8, 8), torch.rand(1, 8, 8), torch.rand(1, 8, 9), torch.zeros(2, 8, 8)
        )


@pytest.mark.parametrize(("count", "columns"), [(8, 8), (24, 8), (5, 3), (2, 4)])
def test_tile_grid_lays_out_like_torchvision_make_grid(count, columns):
    """regnet's own layout (torchvision is slow to import) equals make_grid's for N > 1."""
    tv_utils = pytest.importorskip("torchvision.utils")
    tiles = torch.rand(count, 3, 6, 9, generator=torch.Generator().manual_seed(count))
    expected = tv_utils.make_grid(tiles, nrow=columns, padding=PAD, pad_value=1.0)
    torch.testing.assert_close(tile_grid(tiles, columns, PAD, 1.0), expected, rtol=0, atol=0)
