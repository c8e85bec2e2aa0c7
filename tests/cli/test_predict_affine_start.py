"""``predict.py affine_start``: register.py's affine alignment before the network, the network's
field composed with it exactly; and bundled checkpoints (``ckpt=NAME``)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from phantoms import brain_labels, render, resample, rigid_matrix
from tiny_models import train_tiny_checkpoint

from regnet.bundled import BUNDLED_MODELS, WEIGHTS_DIR, bundle_checkpoint, resolve_checkpoint
from regnet.cli.predict import after_affine, main
from regnet.data.io import DataError
from regnet.pipeline import load_network
from regnet.spatial import affine_matrix, affine_to_ddf

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = -31.0
SHAPE = (32, 32, 32)
TRUTH = rigid_matrix((0.0, 0.0, 20.0), (3.0, -2.0, 1.0), (np.array(SHAPE) - 1) / 2)
"""Fixed voxel -> moving voxel: 20 degrees about the third axis and a shift of ~4 voxels; both
headers are the same, so the headers' alignment leaves all of it."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("train"))


@pytest.mark.parametrize("ndim", [2, 3])
def test_after_affine_is_the_affine_of_the_displaced_point(ndim):
    shape = (5, 6, 7)[:ndim]
    matrix = affine_matrix(
        translation=torch.tensor([[1.5, -2.0, 0.5][:ndim]]),
        rotation=torch.tensor([[0.3, -0.2, 0.1][: 1 if ndim == 2 else 3]]),
        log_scale=torch.tensor([[0.1, -0.1, 0.05][:ndim]]),
    ).double()
    torch.testing.assert_close(
        after_affine(matrix, torch.zeros(1, ndim, *shape)),
        affine_to_ddf(matrix, shape).float(),
        atol=1e-5,
        rtol=0,
    )
    shift = torch.tensor([0.7, -1.2, 0.4][:ndim])
    field = shift.view(1, ndim, *[1] * ndim).expand(1, ndim, *shape).clone()
    # x -> A (x + d) + t - x = (A x + t - x) + A d
    expected = affine_to_ddf(matrix, shape).float() + (
        matrix[0, :ndim, :ndim].float() @ shift
    ).view(1, ndim, *[1] * ndim)
    torch.testing.assert_close(after_affine(matrix, field), expected, atol=1e-5, rtol=0)


def dice_mean(a: np.ndarray, b: np.ndarray) -> float:
    values = [
        2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k))
        for k in np.unique(a[a > 0])
    ]
    return float(np.mean(values))


def save(path, array):
    nib.save(nib.Nifti1Image(np.asarray(array), AFFINE), str(path))
    return path


@pytest.fixture
def rotated_pair(tmp_path):
    fixed_labels = brain_labels(SHAPE)
    moving_labels = resample(fixed_labels, np.linalg.inv(TRUTH), order=0).astype(np.int16)
    files = {
        "fixed": save(tmp_path / "f.nii.gz", render(fixed_labels, seed=1)),
        "moving": save(tmp_path / "m.nii.gz", render(moving_labels, seed=2)),
        "fl": save(tmp_path / "fl.nii.gz", fixed_labels),
        "ml": save(tmp_path / "ml.nii.gz", moving_labels),
    }
    return files, dice_mean(fixed_labels, moving_labels)


def run_predict(checkpoint, files, out, *overrides):
    main(
        [
            f"ckpt={checkpoint}",
            f"pair=[{files['fixed']},{files['moving']}]",
            f"labels=[{files['fl']},{files['ml']}]",
            f"out={out}",
            "device=cpu",
            "overview=false",
            "preprocess.shape=[32,32,32]",
            *overrides,
        ]
    )
    return json.loads((out / "metrics.json").read_text())


def test_affine_start_recovers_a_rotated_pair_the_network_alone_cannot(
    checkpoint, rotated_pair, tmp_path
):
    files, header_dice = rotated_pair
    assert header_dice < 0.6
    plain = run_predict(checkpoint, files, tmp_path / "plain", "affine_start=false")
    started = run_predict(checkpoint, files, tmp_path / "start", "affine_start=true")
    assert plain["dice_mean"] < 0.65
    assert started["dice_mean"] > 0.75  # 2 mm voxels, small ventricles; finest level skipped
    scores = started["info"]["start_check"]["scores"]
    assert list(scores) == ["header", "affine", "network"]
    assert started["info"]["start_check"]["kept"] in ("affine", "network")


def test_auto_follows_the_checkpoint_and_bundling_keeps_the_weights(
    checkpoint, rotated_pair, tmp_path
):
    files, _ = rotated_pair
    bundled = bundle_checkpoint(
        checkpoint, tmp_path / "m.ckpt", {"predict": {"affine_start": True}}
    )
    assert bundled.stat().st_size < checkpoint.stat().st_size  # no optimiser state, loops, ...
    original, stripped = load_network(checkpoint), load_network(bundled)
    for (name, a), (_, b) in zip(
        original.model.state_dict().items(), stripped.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    assert stripped.config["predict"] == {"affine_start": True}
    auto = run_predict(bundled, files, tmp_path / "auto")
    assert "affine" in auto["info"]["start_check"]["scores"]
    auto = run_predict(checkpoint, files, tmp_path / "auto_plain")
    assert "affine" not in auto["info"]["start_check"]["scores"]


def test_a_name_resolves_to_the_bundled_file_and_a_path_wins(tmp_path, monkeypatch):
    name = next(iter(BUNDLED_MODELS))
    assert resolve_checkpoint(name) == WEIGHTS_DIR / BUNDLED_MODELS[name]
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text("a file of that name")
    assert resolve_checkpoint(name) == Path(name)  # the file in the working folder
    assert resolve_checkpoint("other.ckpt") == Path("other.ckpt")


def test_bundling_refuses_a_file_not_from_regnet_train(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(DataError, match="not a regnet-train checkpoint"):
        bundle_checkpoint(path, tmp_path / "y.ckpt")
    assert not (tmp_path / "y.ckpt").exists()


def test_a_bad_affine_start_setting_is_refused_before_any_pair(checkpoint, rotated_pair, tmp_path):
    files, _ = rotated_pair
    with pytest.raises(SystemExit) as stop:
        run_predict(checkpoint, files, tmp_path / "bad", "affine_start=maybe")
    assert stop.value.code == 2
    assert not (tmp_path / "bad").exists()
