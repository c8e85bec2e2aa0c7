"""Images that cannot be registered (empty, constant, out of each other's field of view) and
masks that select nothing: ``register.py``, ``predict.py`` and ``evaluate.py`` each stop with one
line naming the file and the problem, exit status 2, and write nothing; over a list, the bad row
is listed and the others go on (or, with ``fail_fast=true``, the run stops at it)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_evaluate import run_main as run
from tiny_models import train_tiny_checkpoint
from unsafe_pickle import write_malicious_checkpoint

from regnet.cli.evaluate import main as evaluate_main
from regnet.cli.predict import main as predict_main
from regnet.cli.register import main as register_main

SHAPE = (12, 10, 8)
AFFINE = np.array([[2.0, 0, 0, -12.0], [0, 2.0, 0, -10.0], [0, 0, 2.0, -8.0], [0, 0, 0, 1]])


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def textured(shape=SHAPE) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.linspace(0, np.pi, n) for n in shape], indexing="ij")
    return (100 * np.sin(i) * np.sin(j + 0.3) * np.cos(0.5 * k) + 50).astype(np.float32)


def bad_moving(case: str, folder: Path) -> tuple[Path, str]:
    """A moving image for ``case`` and the problem the error line must state."""
    if case == "constant":
        return save(folder / "flat.nii.gz", np.full(SHAPE, 7.0, np.float32)), (
            "image is constant (every voxel is 7): nothing to register"
        )
    if case == "all_zero":
        return save(folder / "zeros.nii.gz", np.zeros(SHAPE, np.float32)), (
            "image is constant (every voxel is 0)"
        )
    if case == "no_voxels":
        return save(folder / "none.nii.gz", np.zeros((0, 10, 8), np.float32)), (
            "image holds no voxels (size 0)"
        )
    if case == "elsewhere":  # the same grid 500 mm to the right
        far = AFFINE.copy()
        far[0, 3] += 500.0
        return save(folder / "far.nii.gz", textured(), far), (
            f"field of view does not overlap that of the fixed image {folder / 'fixed.nii.gz'}"
            " in world space as the headers place them (moving x 487.0..511.0"
        )
    raise AssertionError(case)


CASES = ["constant", "all_zero", "no_voxels", "elsewhere"]


def assert_refused(status: int, err: str, subject: Path, problem: str) -> None:
    assert status == 2
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {subject}: {problem}"), err


@pytest.fixture
def fixed(tmp_path: Path) -> Path:
    return save(tmp_path / "fixed.nii.gz", textured())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return train_tiny_checkpoint(tmp_path_factory.mktemp("train"))


@pytest.mark.parametrize("case", CASES)
def test_register_refuses(case, fixed, tmp_path, capsys):
    moving, problem = bad_moving(case, tmp_path)
    before = sorted(tmp_path.iterdir())
    args = [f"fixed={fixed}", f"moving={moving}", f"out={tmp_path / 'out'}", "device=cpu"]
    assert_refused(*run(register_main, args, capsys), moving, problem)
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("case", CASES)
def test_predict_refuses(case, fixed, checkpoint, tmp_path, capsys):
    moving, problem = bad_moving(case, tmp_path)
    before = sorted(tmp_path.iterdir())
    args = [f"ckpt={checkpoint}", f"pair=[{fixed},{moving}]", f"out={tmp_path / 'out'}"]
    assert_refused(*run(predict_main, [*args, "device=cpu"], capsys), moving, problem)
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("case", CASES)
def test_evaluate_lists_a_bad_row_and_goes_on_or_stops_with_fail_fast(
    case, fixed, tmp_path, capsys
):
    """A bad row is listed with its error and the other rows are evaluated (exit status 2 at
    the end); with ``fail_fast=true`` the run stops there with the file's one line and writes no
    tables."""
    moving, problem = bad_moving(case, tmp_path)
    listing = tmp_path / "pairs.csv"
    listing.write_text(f"fixed,moving\nfixed.nii.gz,fixed.nii.gz\nfixed.nii.gz,{moving.name}\n")
    out = tmp_path / "eval"
    args = [f"pairs={listing}", "methods=[identity]", f"out={out}", "device=cpu"]
    status, err = run(evaluate_main, args, capsys)
    bad = err.splitlines()[0]
    assert status == 2 and bad.startswith(f"failed: 002_{moving.name.split('.')[0]}_to_fixed")
    assert f"identity: {moving}: {problem}" in bad
    assert err.splitlines()[1].startswith(f"error: {out / 'summary.md'}: 1 of 2 results failed")
    with open(out / "per_pair.csv", newline="") as handle:
        good, failed = csv.DictReader(handle)
    assert good["error"] == "" and float(good["sdlogj"]) == 0.0 and good["dice_mean"] == ""
    assert failed["error"].startswith(f"{moving}: {problem}") and failed["sdlogj"] == ""
    stopped = tmp_path / "stopped"
    listing.write_text(f"fixed,moving\nfixed.nii.gz,{moving.name}\nfixed.nii.gz,fixed.nii.gz\n")
    args = [f"pairs={listing}", "methods=[identity]", f"out={stopped}", "fail_fast=true"]
    assert_refused(*run(evaluate_main, args, capsys), moving, problem)
    assert [p.name for p in stopped.iterdir()] == ["manifest"]  # no tables
    (line,) = (stopped / "manifest" / "rank0.jsonl").read_text().splitlines()  # the 2nd never ran
    assert json.loads(line)["status"] == "failed"


def test_register_refuses_a_mask_that_selects_nothing(fixed, tmp_path, capsys):
    moving = save(tmp_path / "moving.nii.gz", textured()[::-1].copy())
    fixed_mask = save(tmp_path / "fixed_mask.nii.gz", np.ones(SHAPE, np.uint8))
    empty_mask = save(tmp_path / "moving_mask.nii.gz", np.zeros(SHAPE, np.uint8))
    before = sorted(tmp_path.iterdir())
    args = [f"fixed={fixed}", f"moving={moving}", f"masks=[{fixed_mask},{empty_mask}]"]
    status, err = run(register_main, [*args, f"out={tmp_path / 'out'}", "device=cpu"], capsys)
    assert_refused(status, err, empty_mask, "mask selects no voxel (every value is 0)")
    assert sorted(tmp_path.iterdir()) == before


def test_evaluate_refuses_a_checkpoint_carrying_code(fixed, tmp_path, capsys):
    marker = tmp_path.parent / f"{tmp_path.name}-ran"
    sent = write_malicious_checkpoint(tmp_path / "sent.ckpt", marker)
    listing = tmp_path / "pairs.csv"
    listing.write_text("fixed,moving\nfixed.nii.gz,fixed.nii.gz\n")
    before = sorted(tmp_path.iterdir())
    args = [f"pairs={listing}", f"methods=[ckpt:{sent}]", f"out={tmp_path / 'eval'}"]
    status, err = run(evaluate_main, [*args, "device=cpu"], capsys)
    assert_refused(status, err, sent, "refused: reading it would run code stored in the file")
    assert not marker.exists()
    assert sorted(tmp_path.iterdir()) == before
