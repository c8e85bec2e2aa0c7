"""Output heads: units of the predicted fields, affine parameterisation, diffeomorphism."""

import math

import numpy as np
import pytest
import torch

from regnet.nets import AffineHead, BSplineHead, SVFHead, VoxelMorph
from regnet.spatial import control_grid_shape, identity_grid, jacobian_determinant

SMALL = {"enc_channels": (8, 8, 8), "dec_channels": (8, 8, 8, 8, 8)}


def set_constant_field(field_conv, value):
    """Make a FieldConv output the constant vector ``value`` everywhere."""
    with torch.no_grad():
        field_conv.conv.weight.zero_()
        field_conv.conv.bias.copy_(torch.tensor(value))


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_dense_field_is_in_image_voxels(factor):
    model = VoxelMorph(2, **SMALL, field_downsize=factor)
    set_constant_field(model.head.field, [1.5, -2.0])
    ddf = model(torch.randn(1, 1, 27, 35), torch.randn(1, 1, 27, 35))["ddf"]
    # the field spans the padded grid (32, 40) corner to corner at 1/factor resolution
    scale = torch.tensor([31 / (32 / factor - 1), 39 / (40 / factor - 1)])
    expected = (torch.tensor([1.5, -2.0]) * scale).view(1, 2, 1, 1).expand(1, 2, 27, 35)
    torch.testing.assert_close(ddf, expected)


@pytest.mark.parametrize("int_downsize", [1, 2])
def test_constant_velocity_integrates_to_a_translation(int_downsize):
    model = VoxelMorph(3, **SMALL, head="svf", int_downsize=int_downsize)
    set_constant_field(model.head.field, [2.0, -1.0, 0.5])
    out = model(torch.randn(1, 1, 13, 17, 11), torch.randn(1, 1, 13, 17, 11))
    expected = torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1, 1).expand(1, 3, 13, 17, 11)
    torch.testing.assert_close(out["ddf"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["velocity"], expected, atol=1e-5, rtol=1e-5)


def test_svf_is_diffeomorphic_for_large_random_velocities():
    torch.manual_seed(0)
    model = VoxelMorph(2, **SMALL, head="svf")  # integrated at half resolution
    with torch.no_grad():
        model.head.field.conv.weight.normal_(0.0, 1.0)
    out = model(torch.randn(2, 1, 27, 35), torch.randn(2, 1, 27, 35))
    velocity = out["velocity"]
    assert velocity.abs().max() > 5.0  # several voxels
    # used directly as a displacement, this velocity folds badly ...
    assert (jacobian_determinant(velocity) <= 0).float().mean() > 0.1
    # ... its exponential does not
    assert jacobian_determinant(out["ddf"]).min() > 0


def identity_conv(field_conv):
    """Make a FieldConv copy its input channels (centre tap 1, no bias)."""
    with torch.no_grad():
        weight = field_conv.conv.weight
        weight.zero_()
        centre = tuple(k // 2 for k in weight.shape[2:])
        for c in range(weight.shape[0]):
            weight[(c, c, *centre)] = 1.0
        field_conv.conv.bias.zero_()


@pytest.mark.parametrize("factor", [1, 2])
def test_bspline_control_points_sit_at_their_voxel_positions(factor):
    # features holding their own feature-grid coordinates make the head's field the linear
    # map x -> x (in feature voxels), so each interior control point must hold its position
    shape, padded, spacing = (33, 41), (40, 48), 4.0
    head = BSplineHead(2, 2, control_spacing=spacing)
    identity_conv(head.field)
    coarse = tuple(p // factor for p in padded)
    features = identity_grid(coarse).clone()
    out = head(features, shape, padded)
    grid = control_grid_shape(shape, spacing)
    assert out["control_points"].shape == (1, 2, *grid)
    ratio = [(c - 1) / (p - 1) for c, p in zip(coarse, padded, strict=True)]
    delta = [(n - 1) / (g - 3) for n, g in zip(shape, grid, strict=True)]
    for axis in range(2):
        positions = (torch.arange(grid[axis]) - 1.0) * delta[axis]
        values = out["control_points"][0, axis].movedim(axis, 0)[:, grid[1 - axis] // 2]
        # interior points: the averaging window lies inside the feature grid
        margin = math.ceil(spacing / 2 / factor + 1) / ratio[axis]
        inside = (positions >= margin) & (positions <= padded[axis] - 1 - margin)
        assert inside.sum() >= 3
        torch.testing.assert_close(values[inside], positions[inside], atol=1e-4, rtol=0)


def test_bspline_constant_field_gives_a_translation():
    head = BSplineHead(3, 4, control_spacing=(3, 4, 5))
    set_constant_field(head.field, [0.5, -1.0, 2.0])
    out = head(torch.randn(1, 4, 16, 24, 16), (13, 17, 11), (16, 24, 16))
    expected = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1, 1)
    assert out["control_points"].shape == (1, 3, *control_grid_shape((13, 17, 11), (3, 4, 5)))
    torch.testing.assert_close(out["control_points"], expected.expand_as(out["control_points"]))
    torch.testing.assert_close(out["ddf"], expected.expand(1, 3, 13, 17, 11))


def test_rigid_head_parameterisation_2d():
    head = AffineHead(2, 5, transform="rigid")
    shape = (27, 35)
    params = [0.5, -0.25, 0.3]  # translation in half-extents, angle in radians
    with torch.no_grad():
        head.linear.bias.copy_(torch.tensor(params))
    matrix = head(torch.randn(2, 5, 4, 5), shape)["matrix"]
    angle = params[2]
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = np.array([13.0, 17.0])
    shift = np.array([0.5 * 13.0, -0.25 * 17.0])
    expected = np.eye(3)
    expected[:2, :2] = rot
    expected[:2, 2] = centre + shift - rot @ centre
    for b in range(2):
        np.testing.assert_allclose(matrix[b].detach().numpy(), expected, atol=1e-5)


def test_affine_head_is_identity_at_init_and_has_12_dof_in_3d():
    head = AffineHead(3, 6, transform="affine")
    assert head.linear.out_features == 12
    out = head(torch.randn(2, 6, 3, 3, 3), (13, 17, 11))
    assert torch.equal(out["matrix"], torch.eye(4).expand(2, 4, 4))
    assert torch.equal(out["ddf"], torch.zeros(2, 3, 13, 17, 11))
    assert AffineHead(3, 6, transform="rigid").linear.out_features == 6


def test_rigid_head_with_spacing_is_rigid_in_millimetres():
    spacing = (1.0, 2.0, 3.0)
    head = AffineHead(3, 4, transform="rigid", spacing=spacing)
    with torch.no_grad():
        head.linear.bias.copy_(torch.tensor([0.1, 0.0, -0.2, 0.3, -0.2, 0.4]))
    matrix = head(torch.randn(1, 4, 2, 2, 2), (13, 17, 11))["matrix"][0, :3, :3].double()
    d = torch.diag(torch.tensor(spacing, dtype=torch.float64))
    world = d @ matrix @ torch.linalg.inv(d)
    torch.testing.assert_close(
        world @ world.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AffineHead(2, 4, transform="similarity"), "transform"),
        (lambda: BSplineHead(2, 4, control_spacing=(4, 4, 4)), "control_spacing"),
        (lambda: BSplineHead(2, 4, control_spacing=0), "control_spacing"),
        (lambda: VoxelMorph(2, **SMALL, head="svf", int_steps=0), "int_steps"),
        (lambda: VoxelMorph(2, **SMALL, head="flow"), "head"),
    ],
)
def test_bad_head_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_output_layers_run_in_float32_under_autocast():
    torch.manual_seed(0)
    dense, affine = SVFHead(3, 8), AffineHead(3, 8)
    with torch.no_grad():
        dense.field.conv.weight.normal_(0.0, 0.5)
        affine.linear.weight.normal_(0.0, 0.1)
    features = torch.randn(1, 8, 16, 24, 16).to(torch.bfloat16)
    reference = (dense(features, (13, 17, 11), (16, 24, 16)), affine(features, (13, 17, 11)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = (dense(features, (13, 17, 11), (16, 24, 16)), affine(features, (13, 17, 11)))
    for got, want in zip(out, reference, strict=True):
        for key in want:
            assert got[key].dtype == torch.float32
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
