"""Loss registry, spec parsing and the weighted composite."""

import pytest
import torch

from regnet.losses import DEFAULT_WEIGHTS, LNCC, LOSS_TERMS, CompositeLoss, build_loss


def _inputs(ndim=2, labels=False):
    shape = (8,) * ndim
    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, *shape, generator=generator)
    inputs = {
        "fixed": fixed,
        "warped": 0.5 * fixed + 0.5 * torch.rand(1, 1, *shape, generator=generator),
        "ddf": torch.randn(1, ndim, *shape, generator=generator),
    }
    if labels:
        inputs["fixed_label"] = torch.ones(1, 2, *shape)
        inputs["warped_label"] = torch.ones(1, 2, *shape)
    return inputs


def test_default_weights_cover_registry():
    assert set(DEFAULT_WEIGHTS) == set(LOSS_TERMS)
    assert all(weight > 0 for weight in DEFAULT_WEIGHTS.values())


def test_build_parses_spec_weights_and_options():
    loss = build_loss(" LNCC + grad ", weights={"grad": 0.5}, options={"lncc": {"window": 5}})
    assert list(loss.terms) == ["lncc", "grad"]
    assert loss.weights == {"lncc": DEFAULT_WEIGHTS["lncc"], "grad": 0.5}
    assert isinstance(loss.terms["lncc"], LNCC) and loss.terms["lncc"].window == 5
    assert loss.requires == ("fixed", "warped", "ddf")


def test_total_is_weighted_sum_of_unweighted_terms():
    inputs = _inputs(3)
    loss = build_loss("mse+ncc+grad+bending", weights={"mse": 2.0, "bending": 0.25})
    total, values = loss(inputs)
    assert set(values) == {"mse", "ncc", "grad", "bending"}
    expected = 2.0 * values["mse"] + values["ncc"] + values["grad"] + 0.25 * values["bending"]
    assert total.item() == pytest.approx(expected.item())
    assert values["mse"].item() == pytest.approx(
        ((inputs["fixed"] - inputs["warped"]) ** 2).mean().item()
    )


def test_every_registered_term_runs_and_gives_finite_gradient():
    inputs = _inputs(2, labels=True)
    inputs["target_ddf"] = torch.zeros_like(inputs["ddf"])
    inputs["warped"].requires_grad_()
    inputs["ddf"].requires_grad_()
    total, values = build_loss("+".join(LOSS_TERMS))(inputs)
    total.backward()
    assert all(torch.isfinite(v) for v in values.values())
    assert torch.isfinite(inputs["warped"].grad).all() and inputs["warped"].grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("lncc+foo", {}, "unknown loss term.*'foo'.*valid names: mse, ncc, lncc"),
        ("", {}, "non-empty"),
        ("grad+grad", {}, "repeated"),
        ("lncc", {"weights": {"grad": 1.0}}, "weights given for term"),
        ("lncc", {"options": {"dice": {}}}, "options given for term"),
        ("lncc", {"options": {"lncc": {"size": 3}}}, "bad options for loss term 'lncc'"),
    ],
)
def test_build_errors(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_loss(spec, **kwargs)


def test_check_reports_missing_inputs():
    loss = build_loss("lncc+bending+dice", weights={"dice": 1.0})
    loss.check({"fixed", "warped", "ddf", "fixed_label", "warped_label"})
    with pytest.raises(ValueError) as error:
        loss.check({"fixed", "warped", "ddf"})
    assert str(error.value) == (
        "loss term 'dice' needs inputs fixed_label, warped_label, which this data does not provide"
    )
    with pytest.raises(ValueError, match="'dice' needs inputs fixed_label, warped_label"):
        loss(_inputs(2))


def test_composite_needs_weights_for_each_term():
    with pytest.raises(ValueError, match="no weight given"):
        CompositeLoss({"lncc": LNCC()}, {})
