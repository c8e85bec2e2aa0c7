"""Folding percentage and SDlogJ."""

import math

import numpy as np
import pytest
import torch

from regnet.metrics import jacobian_stats


@pytest.mark.parametrize("shape", [(2, 9, 10), (3, 6, 7, 8), (2, 2, 9, 10), (1, 3, 5, 6, 7)])
def test_identity_has_no_folding_and_zero_sdlogj(shape):
    stats = jacobian_stats(np.zeros(shape, dtype=np.float32))
    assert stats == {"folding_percent": 0.0, "sdlogj": 0.0}


def test_uniform_scaling_has_constant_determinant():
    field = torch.zeros(3, 6, 7, 8)
    field[0] = 0.5 * torch.arange(6.0).view(6, 1, 1)  # det J = 1.5 everywhere
    stats = jacobian_stats(field)
    assert stats["folding_percent"] == 0.0
    assert stats["sdlogj"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_known_folded_band(ndim):
    # u_0(i) = -2 (clip(i, a, a+w) - a): a ramp of slope -2 on rows a..a+w. With central
    # differences det J = 1 + du_0/di is -1 inside the ramp, 0 at its two ends and 1 elsewhere,
    # so rows a..a+w (w + 1 of n) fold; log det is log(1e-9) there and 0 elsewhere.
    n, a, w = 20, 6, 4
    spatial = (n,) + (5,) * (ndim - 1)
    i = torch.arange(n, dtype=torch.float64).view(n, *[1] * (ndim - 1))
    field = torch.zeros(ndim, *spatial, dtype=torch.float64)
    field[0] = (-2.0 * (i.clamp(a, a + w) - a)).expand(spatial)
    stats = jacobian_stats(field)
    p = (w + 1) / n
    assert stats["folding_percent"] == pytest.approx(100.0 * p)
    assert stats["sdlogj"] == pytest.approx(abs(math.log(1e-9)) * math.sqrt(p * (1 - p)))
