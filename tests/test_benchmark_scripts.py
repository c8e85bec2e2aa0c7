"""Smoke tests of the benchmark harness at toy sizes (the real runs are in scripts/benchmark.py)."""

from __future__ import annotations

import mmap
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from benchmark import markdown_table, parse_shape  # noqa: E402
from benchmarks import accuracy, cohort, intersubject, models, ops  # noqa: E402

from regnet.spatial import warp  # noqa: E402


def smooth_image(shape: tuple[int, ...]) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    return (torch.sin(grids[0] / 3.0) + torch.cos(grids[1] / 4.0))[None, None]


def test_peer_warps_share_regnet_convention():
    """A translation (2, -1) voxels moves voxel (i, j) to (i + 2, j - 1) for all three warps."""
    import voxelmorph as vxm
    from monai.networks.blocks import Warp

    image = smooth_image((16, 20))
    ddf = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, 16, 20).contiguous()
    shifted = image[..., 2:, :-1]
    interior = (..., slice(0, 14), slice(1, 20))
    for warped in (
        warp(image, ddf),
        vxm.nn.modules.SpatialTransformer()(image, ddf),
        Warp(mode="bilinear", padding_mode="zeros")(image, ddf),
    ):
        torch.testing.assert_close(warped[interior], shifted, atol=1e-5, rtol=0)


def test_vxm_adapter_returns_regnet_ddf():
    """VxmPairwise with a constant velocity (1.5, -0.5): its displacement is that translation
    (away from the zero-padded border) and regnet's warp reproduces its own warped source."""
    torch.manual_seed(0)
    model = models.build_benchmark_model("vxm", 2)
    conv = model.model.flow_layer.conv0
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([1.5, -0.5]))
    fixed, moving = torch.rand(1, 1, 32, 32), smooth_image((32, 32))
    with torch.inference_mode():
        ddf = model(fixed, moving)
        _, warped_source = model.model(moving, fixed, return_warped_source=True)
    inner = (..., slice(4, -4), slice(4, -4))
    torch.testing.assert_close(ddf[:, 0][inner], torch.full((1, 24, 24), 1.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(ddf[:, 1][inner], torch.full((1, 24, 24), -0.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(warp(moving, ddf)[inner], warped_source[inner], atol=1e-5, rtol=0)


class PairConv(nn.Module):
    """One 3x3 convolution on the concatenated pair: 2 * 9 * 2 * 2 FLOPs per pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([fixed, moving], dim=1))


def test_count_flops_scales_exactly():
    assert models.flop_shape((160, 192, 224)) == (64, 96, 128)
    assert models.count_flops(PairConv(), (100, 130)) == 2 * 9 * 2 * 2 * 100 * 130


def test_peak_rss_sees_a_fresh_allocation():
    resettable = models._reset_peak_rss()
    before = models._rss_bytes()
    # Fresh anonymous pages (a tensor may reuse memory an earlier test freed, which is already
    # resident), above any earlier peak the kernel kept (the reset is not honoured everywhere).
    headroom = max(0, models._peak_rss_bytes(resettable) - before)
    size = headroom + 64 * 2**20
    block = mmap.mmap(-1, size)
    chunk = b"\1" * 2**20
    for start in range(0, size - 2**20 + 1, 2**20):
        block[start : start + 2**20] = chunk
    assert models._peak_rss_bytes(resettable) - before >= headroom + 60 * 2**20
    block.close()


def test_runner_measures_inference_and_a_training_step():
    runner = models._Runner("vm1", (16, 16), models.RunOptions(threads=1))
    first = [p.detach().clone() for p in runner.parameters]
    for mode in ("infer", "train"):
        result = runner.measure(mode)
        assert result["seconds"] > 0 and result["peak_bytes"] >= 0
    assert any(not torch.equal(a, b) for a, b in zip(first, runner.parameters, strict=True))


def test_mean_dice_against_hand_count():
    fixed = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    fixed[..., :2, :] = 1  # label 1: 8 pixels, label 0: 8 pixels
    warped = torch.zeros_like(fixed)
    warped[..., :1, :] = 1  # label 1: 4 pixels, all inside fixed label 1
    # label 1: 2*4/(8+4) = 2/3; label 0: 2*8/(8+12) = 4/5; label 2 absent from both: ignored
    expected = (2 / 3 + 4 / 5) / 2
    assert accuracy.mean_dice(fixed, warped, 3).item() == pytest.approx(expected)


class ZeroField(nn.Module):
    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return torch.zeros(fixed.shape[0], 2, *fixed.shape[2:])


def test_evaluate_identity_field_gives_identity_dice():
    config = accuracy.AccuracyConfig(shape=(24, 24), val_pairs=3)
    result = accuracy.evaluate(ZeroField(), config)
    assert result["dice"] == pytest.approx(result["identity_dice"])
    assert 0 < result["identity_dice"] < 1 and result["folding_pct"] == 0


def test_training_updates_the_model_with_finite_losses():
    config = accuracy.AccuracyConfig(shape=(32, 32), steps=3, batch_size=2, val_pairs=2)
    lines: list[str] = []
    torch.manual_seed(0)
    model = models.build_benchmark_model("vm1", 2)
    first = [p.detach().clone() for p in model.parameters()]
    assert accuracy.train(model, config, log=lines.append, name="vm1") > 0
    totals = [float(line.split("loss ")[1].split(" ")[0]) for line in lines]
    assert len(totals) == 3 and all(torch.isfinite(torch.tensor(totals)))
    assert any(not torch.equal(a, b) for a, b in zip(first, model.parameters(), strict=True))


def test_markdown_and_shape_parsing():
    table = markdown_table([{"a": 1234, "b": 0.012345}, {"a": 5, "c": None}])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1,234 | 0.0123 |", "| 5 |  |"]
    assert parse_shape("160x192x224") == (160, 192, 224)
    with pytest.raises(Exception, match="--shape"):
        parse_shape("1,2,3,4")


def test_baselines_working_grid_recovers_translation_on_the_data_grid():
    """regnet methods of scripts/baselines.py register on register.py's coarser working grid
    and return the field on the data grid: a 2-voxel shift at 1 mm comes back as 2 voxels."""
    import baselines

    assert baselines.working_shape((33, 21, 10), (1.0, 1.0, 2.0), 2.0) == (17, 11, 10)
    shape = (32, 28, 24)
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    centre = [(n - 1) / 2 for n in shape]

    def blob(offset):
        distance = sum(
            (g - c - o) ** 2 / 40.0 for g, c, o in zip(grids, centre, offset, strict=True)
        )
        return torch.exp(-distance)[None]

    fixed, moving = blob((0.0, 0.0, 0.0)), blob((2.0, 0.0, 0.0))
    label = (moving > 0.5).long()
    item = {"fixed": fixed, "moving": moving, "moving_label": label}
    warped, ddf, seconds = baselines.register_regnet("rigid", item, (1.0, 1.0, 1.0), 2.0)
    assert ddf.shape == (3, *shape)
    inner = ddf[:, 8:-8, 8:-8, 8:-8].reshape(3, -1).mean(1)
    assert abs(inner[0] - 2.0) < 0.2 and abs(inner[1]) < 0.2 and abs(inner[2]) < 0.2
    assert warped.shape == shape and seconds > 0


def test_baselines_method_names_carry_optional_iterations_or_a_variant():
    import baselines

    assert baselines.split_iterations("regnet-svf:100-60-30") == ("regnet-svf", (100, 60, 30))
    assert baselines.split_iterations("syn") == ("syn", None)
    assert baselines.split_iterations("regnet-svf:dense") == ("regnet-svf", None)
    variants = {"dense": ["mind_sampling=false", "polish_iterations=0"]}
    assert baselines.variant_overrides("regnet-svf:dense", variants) == variants["dense"]
    assert baselines.variant_overrides("regnet-svf", variants) == []
    with pytest.raises(SystemExit):
        baselines.main(["--methods", "syn:10-10", "--data", "nowhere"])
    with pytest.raises(SystemExit):  # a label that no --variant defines
        baselines.main(["--methods", "regnet-svf:other", "--data", "nowhere"])


def test_baselines_variant_overrides_reach_the_engine(monkeypatch):
    """A ``--variant`` override changes what :func:`register_regnet` hands the engine; without
    one it hands what register.py would (``engine_settings`` of the composed config)."""
    import baselines

    seen = []

    def fake_register(fixed, moving, **settings):
        seen.append(settings)
        return types.SimpleNamespace(ddf=torch.zeros(1, 3, *fixed.shape[2:]))

    monkeypatch.setattr(baselines, "regnet_register", fake_register)
    image = torch.rand(1, 12, 12, 12)
    item = {"fixed": image, "moving": image, "moving_label": torch.ones(1, 12, 12, 12).long()}
    baselines.register_regnet("svf", item, (2.0,) * 3, None)
    baselines.register_regnet("svf", item, (2.0,) * 3, None, None, ["mind_sampling=false"])
    assert seen[0]["mind_sampling"] is True and seen[1]["mind_sampling"] is False
    assert seen[0]["loss_options"] == {"mind": {"sigma": (0.3, 0.3, 0.3)}}


def test_cohort_benchmark_writes_a_readable_pair_list(tmp_path):
    from regnet.cli.common import pairs_from_list

    listing = cohort.write_pairs(tmp_path, count=2, size=24, seed=0)
    specs = pairs_from_list(listing)
    names = [f"00{n}_00{n - 1}_moving_to_00{n - 1}_fixed" for n in (1, 2)]
    assert [spec.name for spec in specs] == names
    inputs = specs[1].load()
    assert inputs.fixed.shape == (24, 24, 24) and inputs.fixed.spacing == (2.0, 2.0, 2.0)
    labels = inputs.moving_labels.data
    assert labels.dtype == torch.int64 and 1 < len(labels.unique()) <= 8
    # the runs compare every cell but ``seconds``; text cells must match exactly
    first = [{"pair": "a", "dice_mean": "0.5", "tre_mean_mm": ""}]
    second = [{"pair": "a", "dice_mean": "0.25", "tre_mean_mm": ""}]
    assert cohort.largest_difference(first, second) == 0.25
    assert cohort.largest_difference(first, [dict(second[0], pair="b")]) == float("inf")


def test_intersubject_variants_start_from_register_py_defaults():
    import inspect

    from regnet.optimize import register

    defaults = intersubject.engine_settings([])
    assert set(defaults) <= set(inspect.signature(register).parameters)
    assert defaults["mind_sampling"] is True and defaults["loss"] == "auto"
    dense = intersubject.engine_settings(["mind_sampling=false", "polish_iterations=0"])
    assert dense["mind_sampling"] is False and dense["polish_iterations"] == 0
    assert {k: v for k, v in dense.items() if k not in ("mind_sampling", "polish_iterations")} == {
        k: v for k, v in defaults.items() if k not in ("mind_sampling", "polish_iterations")
    }


def test_smoothing_row_agrees_with_monai():
    (row,) = ops._smooth_rows(ops.make_inputs((14, 12, 10), "cpu"), 1, "cpu")
    assert row["max abs diff"] < 1e-5 and row["regnet s"] > 0


def test_constant_image_warp_rows_agree_with_monai():
    inputs = ops.make_inputs((14, 12, 10), "cpu")
    rows = ops._warp_rows(inputs, 1, "cpu")
    assert ["1 channel," in rows[2]["operation"], "12 channels," in rows[3]["operation"]] == [
        True,
        True,
    ]
    for row in rows[2:]:
        assert row["compared"].startswith("ddf gradient (0 of") and row["regnet s"] > 0


def test_hd95_row_agrees_with_monai():
    (row,) = ops._hd95_rows((20, 18, 16), 1)
    assert row["max abs diff"] < 1e-5 and row["MONAI s"] > 0


def test_similarity_rows_time_lncc_with_its_fixed_statistics_kept_and_recomputed():
    rows = ops.run_similarity_benchmark((12, 10, 8), repeats=1, samples=100)
    losses = {row["operation"]: row["loss"] for row in rows}
    kept = losses["lncc (window 9) forward+backward"]
    assert losses["lncc (window 9), fixed statistics recomputed forward+backward"] == kept
    hand_written = losses["grad of the DDF, hand-written backward forward+backward"]
    autograd = losses["grad of the DDF, through autograd forward+backward"]
    assert hand_written == pytest.approx(autograd, rel=1e-5) and hand_written > 0
