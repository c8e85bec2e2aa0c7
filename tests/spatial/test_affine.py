"""Affine parameterisation, application and conversion to a DDF."""

import math

import pytest
import torch

from regnet.spatial import affine_matrix, affine_to_ddf, apply_affine, jacobian_determinant
from regnet.spatial.affine import image_centre, matrix_from_ddf, rotation_angle_degrees


def test_2d_rotation_about_centre_is_analytic():
    angle = math.pi / 2
    m = affine_matrix(rotation=torch.tensor([[angle]]), centre=[2.0, 3.0])
    # axis 0 rotates towards axis 1: (c + e0) -> (c + e1)
    pts = torch.tensor([[2.0, 3.0], [3.0, 3.0]]).T[None]  # (B, ndim, points): c and c + e0
    out = apply_affine(m, pts)
    expected = torch.tensor([[2.0, 3.0], [2.0, 4.0]]).T[None]  # c and c + e1
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_parameters_compose_as_documented(ndim):
    g = torch.Generator().manual_seed(0)
    n_ang = 1 if ndim == 2 else 3
    t, r = torch.randn(2, ndim, generator=g), 0.3 * torch.randn(2, n_ang, generator=g)
    s, sh = 0.1 * torch.randn(2, ndim, generator=g), 0.1 * torch.randn(2, n_ang, generator=g)
    c = torch.tensor([4.0, 5.0, 6.0][:ndim])
    m = affine_matrix(t, r, s, sh, centre=c)
    rot = affine_matrix(rotation=r, ndim=ndim)[:, :ndim, :ndim]
    shear = affine_matrix(shear=sh, ndim=ndim)[:, :ndim, :ndim]
    scale = torch.diag_embed(torch.exp(s))
    linear = rot @ shear @ scale
    torch.testing.assert_close(m[:, :ndim, :ndim], linear)
    torch.testing.assert_close(m[:, :ndim, ndim], c + t - (linear @ c.unsqueeze(-1)).squeeze(-1))
    # rotation matrices are orthonormal with det 1
    eye = torch.eye(ndim).expand(2, -1, -1)
    torch.testing.assert_close(rot @ rot.transpose(1, 2), eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(2))


def test_rigid_with_spacing_is_rigid_in_world_space():
    spacing = torch.tensor([1.0, 2.5, 0.8], dtype=torch.float64)
    r = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    m = affine_matrix(rotation=r, spacing=spacing.tolist(), centre=[3.0, 4.0, 5.0])
    world = torch.diag(spacing) @ m[0, :3, :3] @ torch.diag(1 / spacing)
    torch.testing.assert_close(world @ world.T, torch.eye(3, dtype=torch.float64))


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_ddf_jacobian_equals_det_and_fit_recovers_matrix(ndim):
    shape = (9, 10, 11)[:ndim]
    n_ang = 1 if ndim == 2 else 3
    m = affine_matrix(
        torch.tensor([[1.0, -2.0, 0.5][:ndim]]),
        torch.full((1, n_ang), 0.2),
        torch.tensor([[0.1, -0.2, 0.05][:ndim]]),
        torch.full((1, n_ang), 0.1),
        centre=image_centre(shape),
    )
    ddf = affine_to_ddf(m, shape)
    det = jacobian_determinant(ddf)
    torch.testing.assert_close(
        det, torch.linalg.det(m[:, :ndim, :ndim]).expand_as(det), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(matrix_from_ddf(ddf), m, atol=1e-4, rtol=0)
    # (B, n, n+1) form gives the same field
    torch.testing.assert_close(affine_to_ddf(m[:, :ndim], shape), ddf)


def test_rotation_angle_degrees():
    m = affine_matrix(rotation=torch.tensor([[math.radians(30.0)]]))
    torch.testing.assert_close(rotation_angle_degrees(m), torch.tensor([30.0]), atol=1e-4, rtol=0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="rotation must have shape"):
        affine_matrix(torch.zeros(2, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="matrix must have shape"):
        affine_to_ddf(torch.zeros(1, 5, 5), (4, 4, 4, 4))
