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
