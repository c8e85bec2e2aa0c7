"""``register.py`` with its defaults on head phantoms that differ as users' scans do: skull on one
side only (both directions), inverted contrast; and a result worse than the start is reported
and not returned."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from phantoms import brain_labels, render, resample, rigid_matrix

import regnet.cli.register as register_cli
from regnet.cli.register import main

SPACING_MM = 2.0
AFFINE = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
AFFINE[:3, 3] = -39.0


def save(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return path


def dice_mean(a: np.ndarray, b: np.ndarray) -> float:
    values = [
        2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k))
        for k in np.unique(a[a > 0])
    ]
    return float(np.mean(values))


SHAPE = (40, 40, 40)
TRUTH = rigid_matrix((8.0, 0.0, -5.0), (3.0, -2.0, 1.0), (np.array(SHAPE) - 1) / 2)
"""Fixed voxel -> moving voxel map of every pair: 8 and 5 degrees, a shift of about 4 voxels."""


def moved(volume: np.ndarray, order: int = 1) -> np.ndarray:
    """A fixed-frame volume as the moving image holds it (``moving(TRUTH x) = volume(x)``)."""
    return resample(volume, np.linalg.inv(TRUTH), order)


@pytest.fixture(scope="module")
def labels():
    """Fixed labels and the same anatomy as the moving image holds it."""
    fixed = brain_labels(SHAPE)
    return fixed, moved(fixed, order=0).astype(np.int16)


def run_register(tmp_path, labels, fixed_image, moving_image, *overrides, affine=AFFINE):
    fixed_labels, moving_labels = labels
    files = {
        "fixed": save(tmp_path / "fixed.nii.gz", fixed_image, affine),
        "moving": save(tmp_path / "moving.nii.gz", moving_image, affine),
        "fl": save(tmp_path / "fixed_labels.nii.gz", fixed_labels, affine),
        "ml": save(tmp_path / "moving_labels.nii.gz", moving_labels, affine),
    }
    out = tmp_path / "out"
    main(
        [
            f"fixed={files['fixed']}",
            f"moving={files['moving']}",
            f"labels=[{files['fl']},{files['ml']}]",
            f"out={out}",
            "device=cpu",
            "overview=false",
            *overrides,
        ]
    )
    return json.loads((out / "metrics.json").read_text()), out


@pytest.mark.parametrize("skull", ["fixed", "moving"])
def test_skull_on_one_side_only_is_registered(tmp_path, labels, skull):
    fixed_labels, moving_labels = labels
    fixed_image = render(fixed_labels, skull=skull == "fixed", seed=1)
    moving_image = moved(render(fixed_labels, skull=skull == "moving", seed=2))
    header = dice_mean(fixed_labels, moving_labels)
    metrics, _ = run_register(tmp_path, labels, fixed_image, moving_image)
    assert header < 0.6
    assert metrics["dice_mean"] > 0.85, metrics["dice_mean"]
    assert metrics["folding_percent"] == 0.0
    # On this 40^3 label-rendered phantom the default's deformable result (sampled MIND) scores
    # below its affine stage with the skull on either side, and the start check keeps the
    # affine alignment (the Dice above); the dense MIND term on every level improves on it.
    assert metrics["info"]["start_check"]["kept"] in ("result", "affine")
    (tmp_path / "dense").mkdir()
    dense, _ = run_register(tmp_path / "dense", labels, fixed_image, moving_image,
                            "mind_sampling=false")  # fmt: skip
    assert dense["info"]["start_check"]["kept"] == "result"
    assert dense["dice_mean"] > 0.9, dense["dice_mean"]


def test_inverted_contrast_is_recovered_by_the_default_affine_stage(tmp_path, labels):
    fixed_labels, moving_labels = labels
    fixed_image = render(fixed_labels, seed=1)
    moving_image = moved(render(fixed_labels, inverted=True, seed=2))
    metrics, _ = run_register(tmp_path, labels, fixed_image, moving_image, "transform=affine")
    assert metrics["dice_mean"] > 0.85, metrics["dice_mean"]


def test_a_result_worse_than_the_start_is_reported_and_not_returned(
    tmp_path, labels, monkeypatch, capsys
):
    fixed_labels, _ = labels
    image = render(fixed_labels, seed=1)
    engine = register_cli.register

    def misaligning(*args, **kwargs):  # a registration that ends 5 voxels off
        result = engine(*args, **kwargs)
        result.ddf = torch.zeros_like(result.ddf)
        result.ddf[:, 0] = 5.0
        return result

    monkeypatch.setattr(register_cli, "register", misaligning)
    same = (fixed_labels, fixed_labels)
    metrics, out = run_register(tmp_path, same, image, image, "transform=rigid")
    check = metrics["info"]["start_check"]
    assert check["kept"] == "header"
    assert check["scores"]["result"]["nmi"] < check["scores"]["header"]["nmi"]
    assert metrics["dice_mean"] == 1.0
    disp = np.asarray(nib.load(out / "disp_mm.nii.gz").dataobj)
    assert np.abs(disp).max() == 0.0
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert message.startswith("warning: ") and "worse than the header alignment" in message


@pytest.mark.parametrize("choice", ["lncc+grad", "mind+grad"])
def test_an_lncc_pair_is_registered_on_the_finer_grid(tmp_path, labels, monkeypatch, choice):
    """1 mm scans: the start and the affine stage run on the 1.5 mm grid; when ``loss=auto``
    chooses ``lncc`` the deformable stage runs on 1.25 mm from their matrix, else on 1.5 mm."""
    monkeypatch.setattr("regnet.optimize.engine.choose_loss", lambda correlation: choice)
    fixed_labels, _ = labels
    fixed_image, moving_image = render(fixed_labels, seed=1), moved(render(fixed_labels, seed=2))
    metrics, _ = run_register(tmp_path, labels, fixed_image, moving_image, affine=np.eye(4))
    info = metrics["info"]
    spacing = np.linalg.norm(np.asarray(info["working_grid"]["affine"])[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, 1.25 if choice == "lncc+grad" else 1.5)
    assert info["loss"] == choice
    assert {"search/level0", "affine/level1", "svf/level2"} <= set(info["level_steps"])
    assert metrics["dice_mean"] > 0.85, metrics["dice_mean"]


@pytest.mark.parametrize(
    ("overrides", "spacing"),
    [(["loss=lncc+grad"], 1.25), (["transform=affine", "loss=lncc+grad"], 1.5)],
)
def test_a_given_lncc_loss_works_on_the_finer_grid_when_deformable(
    tmp_path, labels, overrides, spacing
):
    fixed_labels, _ = labels
    fixed_image, moving_image = render(fixed_labels, seed=1), moved(render(fixed_labels, seed=2))
    metrics, _ = run_register(
        tmp_path, labels, fixed_image, moving_image, *overrides, affine=np.eye(4)
    )
    grid = np.asarray(metrics["info"]["working_grid"]["affine"])[:3, :3]
    np.testing.assert_allclose(np.linalg.norm(grid, axis=0), spacing)
    assert metrics["dice_mean"] > 0.85, metrics["dice_mean"]
