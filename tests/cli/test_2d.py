"""2D end to end: a 2D checkpoint from ``train.py`` applied by ``predict.py`` to PNG and 2D NIfTI
pairs, and ``evaluate.py`` over a 2D pair list, with outputs checked against SimpleITK."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from tiny_models import train_tiny_checkpoint

from regnet.cli.evaluate import main as evaluate_main
from regnet.cli.predict import main as predict_main

SIZE = 32  # pixels per side of the PNG pair


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small 2D VoxelMorph trained for two steps on 32^2 synthetic pairs (experiment=debug)."""
    return train_tiny_checkpoint(tmp_path_factory.mktemp("train2d"), "debug")


def blob(columns: np.ndarray, rows: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    return 200.0 * np.exp(-((columns - centre[0]) ** 2 / 40.0 + (rows - centre[1]) ** 2 / 25.0))


def write_png(path: Path, centre: tuple[float, float]) -> Path:
    rows, columns = np.mgrid[0:SIZE, 0:SIZE]
    sitk.WriteImage(sitk.GetImageFromArray(blob(columns, rows, centre).astype(np.uint8)), path)
    return path


def run(entry, args: list[str], capsys) -> tuple[int, str]:
    try:
        entry(args)
        status = 0
    except SystemExit as stop:
        status = int(stop.code)
    return status, capsys.readouterr().err


def pixels(path: Path) -> np.ndarray:
    """An image as SimpleITK reads it, ``(i, j)`` = (column, row), float64."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).T.astype(np.float64)


def test_predict_registers_a_png_pair(checkpoint, tmp_path, capsys):
    fixed = write_png(tmp_path / "a.png", (15.0, 16.0))
    moving = write_png(tmp_path / "b.png", (18.0, 14.0))
    out = tmp_path / "out"
    args = [f"ckpt={checkpoint}", f"pair=[{fixed},{moving}]", f"out={out}", "device=cpu"]
    status, err = run(predict_main, [*args, "refine.steps=40", "refine.levels=1"], capsys)
    assert status == 0, err
    disp = nib.load(out / "disp_mm.nii.gz")
    assert disp.shape == (SIZE, SIZE, 1, 1, 2)
    np.testing.assert_allclose(disp.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))  # PNG in RAS
    warped = nib.load(out / "warped.nii.gz")
    assert warped.shape == (SIZE, SIZE)
    np.testing.assert_allclose(warped.affine, disp.affine)
    before = np.mean((pixels(moving) - pixels(fixed)) ** 2)
    after = np.mean((warped.get_fdata() - pixels(fixed)) ** 2)
    assert after < 0.5 * before
    # warped.png: the warped image, 8-bit like its input, in the fixed image's pixel layout
    expected = np.clip(np.round(warped.get_fdata()), 0, 255)
    np.testing.assert_array_equal(pixels(out / "warped.png"), expected)
    assert json.loads((out / "metrics.json").read_text())["outputs"]["warped_png"] == "warped.png"


def oblique_2d_affine(angle_degrees: float, spacing, origin) -> np.ndarray:
    angle = math.radians(angle_degrees)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    affine = np.eye(4)
    affine[:2, :2] = rotation * np.asarray(spacing)
    affine[:2, 3] = origin
    return affine


def test_predict_on_oblique_2d_nifti_matches_simpleitk(checkpoint, tmp_path, capsys):
    fixed_affine = oblique_2d_affine(30.0, (1.2, 0.9), (-15.0, -10.0))
    moving_affine = oblique_2d_affine(0.0, (1.0, 1.0), (-17.0, -16.0))
    rows, columns = np.mgrid[0:28, 0:26]
    for name, affine, centre in (("f", fixed_affine, (12, 14)), ("m", moving_affine, (15, 13))):
        data = blob(columns, rows, centre).T.astype(np.float32)  # (i, j) = (26, 28)
        nib.save(nib.Nifti1Image(data, affine), tmp_path / f"{name}.nii.gz")
    out = tmp_path / "out"
    args = [f"ckpt={checkpoint}", f"pair=[{tmp_path / 'f.nii.gz'},{tmp_path / 'm.nii.gz'}]"]
    status, err = run(predict_main, [*args, f"out={out}", "device=cpu"], capsys)
    assert status == 0, err
    for name in ("disp_mm", "itk_warp", "warped", "jacdet"):
        np.testing.assert_allclose(nib.load(out / f"{name}.nii.gz").affine, fixed_affine, atol=1e-5)
    # SimpleITK: the warped image lies on the fixed grid and is the moving image resampled
    # through itk_warp.nii.gz
    fixed = sitk.ReadImage(str(tmp_path / "f.nii.gz"))
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    np.testing.assert_allclose(warped.GetDirection(), fixed.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(warped.GetOrigin(), fixed.GetOrigin(), atol=1e-5)
    field = sitk.ReadImage(str(out / "itk_warp.nii.gz"), sitk.sitkVectorFloat64)
    moving = sitk.ReadImage(str(tmp_path / "m.nii.gz"), sitk.sitkFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    itk_warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform)).T
    ours = sitk.GetArrayFromImage(warped).T
    inner = (slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(ours[inner], itk_warped[inner], atol=1e-3)
    # float input: warped.png spans the moving image's min..max as 0..255
    moving_values = nib.load(tmp_path / "m.nii.gz").get_fdata()
    low, high = moving_values.min(), moving_values.max()
    expected = np.clip(np.round((ours - low) * 255 / (high - low)), 0, 255)
    np.testing.assert_array_equal(pixels(out / "warped.png"), expected)


def test_dimension_mismatches_give_one_line_and_write_nothing(checkpoint, tmp_path, capsys):
    png = write_png(tmp_path / "a.png", (15.0, 16.0))
    volume = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), volume)
    message = f"error: {volume}: is 3D; the checkpoint {checkpoint} holds a 2D model\n"
    for pair in (f"pair=[{volume},{volume}]", f"pair=[{png},{volume}]"):
        out = tmp_path / "out"
        status, err = run(predict_main, [f"ckpt={checkpoint}", pair, f"out={out}"], capsys)
        assert status == 2 and err == message
        assert not out.exists()
    listing = tmp_path / "pairs.csv"
    listing.write_text("fixed,moving\na.png,v.nii.gz\n")
    args = [f"methods=[identity,ckpt:{checkpoint}]", f"pairs={listing}", f"out={tmp_path / 'e'}"]
    status, err = run(evaluate_main, [*args, "fail_fast=true"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {volume}: is 3D, the fixed image {png} is 2D")
    assert not (tmp_path / "e" / "summary.md").exists()


def test_evaluate_over_a_2d_pair_list(checkpoint, tmp_path, capsys):
    centres = {"a": (14.0, 16.0), "b": (17.0, 14.0)}
    for name, centre in centres.items():
        image = write_png(tmp_path / f"{name}.png", centre)
        labels = (pixels(image) > 60).astype(np.uint8)  # (i, j)
        sitk.WriteImage(sitk.GetImageFromArray(labels.T.copy()), tmp_path / f"{name}_labels.mha")
    listing = tmp_path / "pairs.csv"
    listing.write_text(
        "fixed,moving,fixed_label,moving_label\n"
        "a.png,b.png,a_labels.mha,b_labels.mha\n"
        "b.png,a.png,b_labels.mha,a_labels.mha\n"
    )
    out = tmp_path / "eval"
    args = [
        f"methods=[identity,register:rigid,ckpt:{checkpoint}]",
        "register={spacing:null,levels:2}",
        f"pairs={listing}",
        f"out={out}",
        "device=cpu",
        "save_outputs=true",
    ]
    status, err = run(evaluate_main, args, capsys)
    assert status == 0, err
    with open(out / "per_pair.csv", newline="") as handle:
        rows = {(r["method"], r["pair"]): r for r in csv.DictReader(handle)}
    assert len(rows) == 6
    for pair in ("001_b_to_a", "002_a_to_b"):
        identity = float(rows[("identity", pair)]["dice_mean"])
        registered = float(rows[("register:rigid", pair)]["dice_mean"])
        assert identity < 0.8 and registered > identity + 0.1
        assert float(rows[(f"ckpt:{checkpoint}", pair)]["folding_percent"]) == 0.0
    saved = out / "register_rigid" / "001_b_to_a"
    assert nib.load(saved / "warped_labels.nii.gz").shape == (SIZE, SIZE)
    assert (saved / "warped.png").is_file()
