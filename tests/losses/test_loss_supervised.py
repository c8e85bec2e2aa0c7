"""Supervised DDF regression."""

import pytest
import torch

from regnet.losses import DDFRegression


@pytest.mark.parametrize("mode", ["mse", "epe"])
def test_zero_at_target_with_finite_gradient(mode):
    target = torch.randn(2, 3, 4, 5, 6)
    ddf = target.clone().requires_grad_()
    loss = DDFRegression(mode)({"ddf": ddf, "target_ddf": target})
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(ddf.grad).all()


def test_known_values():
    target = torch.zeros(1, 2, 4, 4)
    ddf = torch.zeros(1, 2, 4, 4)
    ddf[:, 0], ddf[:, 1] = 3.0, 4.0
    inputs = {"ddf": ddf, "target_ddf": target}
    assert DDFRegression("mse")(inputs).item() == pytest.approx((9 + 16) / 2)
    assert DDFRegression("epe")(inputs).item() == pytest.approx(5.0)


def test_errors():
    with pytest.raises(ValueError, match="mode"):
        DDFRegression("l1")
    with pytest.raises(ValueError, match="differ in shape"):
        DDFRegression()({"ddf": torch.zeros(1, 2, 4, 4), "target_ddf": torch.zeros(1, 2, 4, 5)})
