"""Scaling and squaring against analytic flows."""

import pytest
import torch

from regnet.spatial import identity_grid, integrate, jacobian_determinant

SHAPES = {2: (31, 29), 3: (17, 19, 15)}


@pytest.mark.parametrize("ndim", [2, 3])
def test_zero_and_constant_velocity(ndim):
    shape = SHAPES[ndim]
    assert integrate(torch.zeros(1, ndim, *shape)).abs().max() == 0
    v = torch.zeros(1, ndim, *shape)
    for a in range(ndim):
        v[:, a] = 0.7 * (a + 1) - 1.0
    torch.testing.assert_close(integrate(v, steps=7), v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_velocity_integrates_to_matrix_exponential(ndim):
    shape = SHAPES[ndim]
    centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    generator = 0.15 * torch.randn(ndim, ndim, generator=gen, dtype=torch.float64)
    grid = identity_grid(shape, dtype=torch.float64)
    rel = grid - centre.view(1, ndim, *([1] * ndim))
    v = torch.einsum("ab,nb...->na...", generator, rel)
    expected = torch.einsum("ab,nb...->na...", torch.linalg.matrix_exp(generator), rel) - rel
    ddf = integrate(v, steps=8)
    core = (slice(None), slice(None), *[slice(n // 4, n - n // 4) for n in shape])
    # the flow of dx/dt = L(x - c) for unit time is x -> c + exp(L)(x - c)
    assert (ddf - expected)[core].abs().max() < 1e-3
    det = jacobian_determinant(ddf)[(slice(None), *core[2:])]
    expected_det = torch.exp(torch.trace(generator))
    assert (det - expected_det).abs().max() < 1e-3


def test_integrated_field_is_diffeomorphic_for_large_velocity():
    gen = torch.Generator().manual_seed(0)
    coarse = 6.0 * torch.randn(1, 2, 5, 5, generator=gen)
    v = torch.nn.functional.interpolate(coarse, size=(40, 40), mode="bicubic", align_corners=True)
    assert (jacobian_determinant(v) <= 0).any()  # used as a displacement it folds
    assert (jacobian_determinant(integrate(v)) > 0).all()


def test_negative_steps_raise():
    with pytest.raises(ValueError, match="steps"):
        integrate(torch.zeros(1, 2, 4, 4), steps=-1)
