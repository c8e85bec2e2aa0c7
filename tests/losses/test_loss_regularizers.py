"""Field regularisers: diffusion (grad), bending energy, Jacobian folding penalty."""

import warnings

import pytest
import torch
from monai.losses import BendingEnergyLoss

from regnet.losses import BendingEnergy, Diffusion, JacobianFolding
from regnet.spatial import identity_grid


def _affine_field(matrix: torch.Tensor, shape) -> torch.Tensor:
    """``u(x) = A x + t`` on a grid of ``shape``, ``(1, ndim, *shape)``."""
    grid = identity_grid(shape, dtype=torch.float64)
    ndim = len(shape)
    field = torch.einsum("ca,ba...->bc...", matrix, grid)
    return field + torch.arange(1.0, ndim + 1, dtype=torch.float64).view(1, ndim, *[1] * ndim)


MATRICES = {
    2: torch.tensor([[0.3, -0.2], [0.1, 0.5]], dtype=torch.float64),
    3: torch.tensor([[0.3, -0.2, 0.0], [0.1, 0.5, 0.2], [-0.4, 0.0, 0.1]], dtype=torch.float64),
}
SHAPES = {2: (9, 10), 3: (6, 7, 8)}


@pytest.mark.parametrize("ndim", [2, 3])
def test_grad_and_bending_zero_on_constant_field(ndim):
    field = torch.full((2, ndim, *SHAPES[ndim]), 1.7)
    assert Diffusion()({"ddf": field}).item() == 0.0
    assert BendingEnergy()({"ddf": field}).item() == 0.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_grad_on_linear_field_equals_analytic_value(ndim):
    matrix = MATRICES[ndim]
    field = _affine_field(matrix, SHAPES[ndim])
    l2 = Diffusion("l2")({"ddf": field}).item()
    l1 = Diffusion("l1")({"ddf": field}).item()
    assert l2 == pytest.approx((matrix**2).sum().item() / ndim**2)
    assert l1 == pytest.approx(matrix.abs().sum().item() / ndim**2)
    assert BendingEnergy()({"ddf": field}).item() == pytest.approx(0.0, abs=1e-20)


def test_grad_sees_checkerboard():
    field = torch.ones(1, 2, 6, 6)
    field[:, :, ::2] = -1.0
    assert Diffusion()({"ddf": field}).item() == pytest.approx(4.0 / 2)


@pytest.mark.parametrize("ndim", [2, 3])
def test_grad_l2_backward_is_autograds(ndim):
    field = torch.randn(2, ndim, *SHAPES[ndim], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda u: Diffusion()({"ddf": u}), (field,))
    value = Diffusion()({"ddf": field})
    (gradient,) = torch.autograd.grad(3.0 * value, field)
    reference = sum((torch.diff(field, dim=axis) ** 2).mean() for axis in range(2, 2 + ndim)) / ndim
    (expected,) = torch.autograd.grad(3.0 * reference, field)
    assert value.item() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("ndim", [2, 3])
def test_bending_quadratic_field_and_equal_to_monai(ndim):
    grid = identity_grid(SHAPES[ndim], dtype=torch.float64)
    field = torch.zeros(1, ndim, *SHAPES[ndim], dtype=torch.float64)
    field[:, 0] = grid[:, 0] ** 2  # d2u_0/dx_0^2 = 2, all else 0
    assert BendingEnergy()({"ddf": field}).item() == pytest.approx(4.0 / ndim)
    random = torch.randn(2, ndim, *SHAPES[ndim], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = BendingEnergyLoss()(random).item()
    assert BendingEnergy()({"ddf": random}).item() == pytest.approx(reference, rel=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_penalty_zero_on_identity_and_mild_field(ndim):
    assert JacobianFolding()({"ddf": torch.zeros(1, ndim, *SHAPES[ndim])}).item() == 0.0
    mild = _affine_field(MATRICES[ndim] * 0.3, SHAPES[ndim])
    assert JacobianFolding()({"ddf": mild}).item() == 0.0


def test_jacobian_penalty_on_folding_field():
    # u_0 = -2 i everywhere: det J = -1, penalty eps - det = 1.01 at every voxel.
    shape = (6, 7, 8)
    field = torch.zeros(1, 3, *shape)
    field[:, 0] = -2.0 * identity_grid(shape)[:, 0]
    field.requires_grad_()
    penalty = JacobianFolding(eps=0.01)({"ddf": field})
    assert penalty.item() == pytest.approx(1.01)
    penalty.backward()
    assert torch.isfinite(field.grad).all() and field.grad.abs().sum() > 0


def test_field_shape_errors():
    with pytest.raises(ValueError, match="ddf"):
        Diffusion()({"ddf": torch.zeros(1, 3, 5, 5)})
    with pytest.raises(ValueError, match="penalty"):
        Diffusion("l3")
    with pytest.raises(ValueError, match="3 voxels"):
        BendingEnergy()({"ddf": torch.zeros(1, 2, 2, 5)})
