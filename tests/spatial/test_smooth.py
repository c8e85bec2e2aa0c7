"""Gaussian smoothing against scipy."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from regnet.spatial.smooth import gaussian_smooth


@pytest.mark.parametrize("shape", [(21, 17), (11, 13, 9)])
def test_matches_scipy_and_keeps_constants(shape):
    image = torch.rand(
        1, 1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    ours = gaussian_smooth(image, 1.5)[0, 0].numpy()
    # same truncation (3 sigma) and replicated edges; kernels differ only in sampling (erf here)
    ref = ndimage.gaussian_filter(image[0, 0].numpy(), 1.5, mode="nearest", truncate=3.0)
    np.testing.assert_allclose(ours, ref, atol=5e-3)
    constant = torch.full((1, 2, *shape), 3.0, dtype=torch.float64)
    torch.testing.assert_close(gaussian_smooth(constant, [1.0, 2.0, 0.5][: len(shape)]), constant)
    assert gaussian_smooth(image, 0.0) is image


@pytest.mark.parametrize(
    ("shape", "sigma", "dtype"),
    [
        ((2, 3, 23, 19), (1.3, 0.6), torch.float32),
        ((1, 2, 17, 15, 12), (2.0, 0.7, 1.1), torch.float32),
        ((1, 3, 16, 13, 11), (0.4, 1.7, 0.0), torch.float64),
        ((1, 1, 12, 10, 9), 0.0005, torch.float64),
    ],
)
def test_equals_monai_separable_gaussian(shape, sigma, dtype):
    """The kernels and filtering are regnet's own (MONAI is slow to import); they must equal
    ``separable_filtering(x, [gaussian_1d(s, 3.0, "erf", True)], "replicate")``."""
    monai_layers = pytest.importorskip("monai.networks.layers")
    x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    sigmas = [sigma] * (len(shape) - 2) if isinstance(sigma, float) else list(sigma)
    kernels = [
        monai_layers.gaussian_1d(torch.tensor(max(s, 1e-3)), 3.0, "erf", True) for s in sigmas
    ]
    expected = monai_layers.separable_filtering(x, kernels, mode="replicate")
    torch.testing.assert_close(gaussian_smooth(x, sigma), expected, atol=1e-6, rtol=0)


def test_gradient_flows_and_cached_kernels_survive_inference_mode():
    with torch.inference_mode():
        gaussian_smooth(torch.rand(1, 1, 8, 9), (0.9, 1.4))  # fills the kernel caches
    x = torch.rand(1, 2, 8, 9, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: gaussian_smooth(t, (0.9, 1.4)), (x,))
    with pytest.raises(ValueError, match="2 sigmas for 3 spatial axes"):
        gaussian_smooth(torch.rand(1, 1, 4, 4, 4), (1.0, 1.0))


@pytest.mark.parametrize(
    ("shape", "sigma"),
    [
        ((2, 3, 9, 11, 7), (1.0, 0.7, 2.0)),
        ((1, 2, 13, 10), 1.5),
        ((1, 1, 17), 0.8),
        ((1, 2, 3, 12, 5), (2.0, 1.0, 0.0)),  # a kernel wider than its axis
    ],
)
def test_backward_pass_is_the_exact_adjoint(shape, sigma):
    """The backward pass (a forward convolution plus the replicate padding's adjoint) equals
    the finite-difference gradient of the forward pass, borders included."""
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: gaussian_smooth(v, sigma), (x,))
