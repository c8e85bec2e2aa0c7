"""Output folder: headers of the fixed image, files that ITK applies identically, safe writing."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import regnet.outputs
from regnet.outputs import (
    OUTPUT_FILES,
    OutputExistsError,
    check_output_dir,
    label_dtype,
    save_image,
    write_registration,
)
from regnet.pipeline import GridField, complete_registration, load_pair_inputs
from regnet.spatial.world import load_itk_displacement

FIXED_SHAPE = (14, 12, 10)
MOVING_SHAPE = (13, 15, 9)
FIXED_AFFINE = np.array(
    [[-1.5, 0, 0, 22.0], [0, 1.2, 0, -8.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]], dtype=float
)  # LAS
MOVING_AFFINE = np.array(
    [[-1.4, 0, 0, 21.0], [0, -1.3, 0, 10.5], [0, 0, 2.1, 2.0], [0, 0, 0, 1]], dtype=float
)  # LPS


def write(path: Path, data: np.ndarray, matrix: np.ndarray, qform_code: int = 1) -> Path:
    image = nib.Nifti1Image(data, matrix)
    image.set_sform(matrix, code=2)
    image.set_qform(matrix, code=qform_code)
    nib.save(image, str(path))
    return path


def smooth_image(shape) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.linspace(0, np.pi, n) for n in shape], indexing="ij")
    return (100 * np.sin(i) * np.sin(j) * np.cos(0.5 * k) + 50).astype(np.float32)


@pytest.fixture
def registration(tmp_path: Path):
    labels = (smooth_image(MOVING_SHAPE) // 30).astype(np.int16)
    write(tmp_path / "fixed.nii.gz", smooth_image(FIXED_SHAPE), FIXED_AFFINE)
    write(tmp_path / "moving.nii.gz", smooth_image(MOVING_SHAPE), MOVING_AFFINE)
    write(tmp_path / "fl.nii.gz", (smooth_image(FIXED_SHAPE) // 30).astype(np.int16), FIXED_AFFINE)
    write(tmp_path / "ml.nii.gz", labels, MOVING_AFFINE)
    inputs = load_pair_inputs(
        tmp_path / "fixed.nii.gz",
        tmp_path / "moving.nii.gz",
        labels=(tmp_path / "fl.nii.gz", tmp_path / "ml.nii.gz"),
    )
    # smooth non-linear field in mm on the fixed grid: translation plus a sine bump
    i, j, k = np.meshgrid(*[np.arange(n, dtype=float) for n in FIXED_SHAPE], indexing="ij")
    bump = np.sin(np.pi * i / (FIXED_SHAPE[0] - 1)) * np.sin(np.pi * j / (FIXED_SHAPE[1] - 1))
    disp = np.stack([1.2 + 2.0 * bump, -0.8 + 1.5 * bump, 0.6 * bump])
    field = GridField(torch.tensor(disp[None], dtype=torch.float32), FIXED_AFFINE)
    return inputs, complete_registration(inputs, field, 0.25, method="test")


def test_outputs_carry_the_fixed_header_and_the_result(tmp_path: Path, registration) -> None:
    inputs, result = registration
    out = tmp_path / "out"
    paths = write_registration(out, inputs, result)
    # the PNG is written for 2D pairs only, affine.tfm for results with an affine stage only
    roles_3d = set(OUTPUT_FILES) - {"warped_png", "affine"}
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES[r] for r in roles_3d)
    assert set(paths) == roles_3d
    for role in ("warped", "warped_labels", "jacdet"):
        image = nib.load(str(out / OUTPUT_FILES[role]))
        assert image.shape == FIXED_SHAPE
        np.testing.assert_allclose(image.affine, FIXED_AFFINE, atol=1e-6)
        np.testing.assert_allclose(image.get_qform(), FIXED_AFFINE, atol=1e-5)
        assert int(image.header["sform_code"]) == 2 and int(image.header["qform_code"]) == 1
    warped = nib.load(str(out / "warped.nii.gz")).get_fdata()
    np.testing.assert_allclose(warped, result.warped[0, 0].numpy(), rtol=1e-6)
    labels = nib.load(str(out / "warped_labels.nii.gz"))
    assert labels.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(labels.dataobj), result.warped_labels[0, 0].numpy())
    jacdet = nib.load(str(out / "jacdet.nii.gz")).get_fdata()
    np.testing.assert_allclose(jacdet, result.jacobian.numpy(), rtol=1e-6)
    stored = out / "jacdet.nii.gz"  # stored gzip blocks, as the fields (FIELD_GZIP_LEVEL)
    assert stored.stat().st_size > len(gzip.decompress(stored.read_bytes()))
    for name in ("disp_mm.nii.gz", "itk_warp.nii.gz"):
        disp, field_affine = load_itk_displacement(out / name)
        np.testing.assert_allclose(disp.numpy(), result.field.disp_mm.numpy(), atol=1e-6)
        np.testing.assert_allclose(field_affine, FIXED_AFFINE, atol=1e-6)
    record = json.loads((out / "metrics.json").read_text())
    assert record["seconds"] == 0.25
    assert record["inputs"]["moving_labels"] == str(inputs.moving_labels.path)
    assert record["info"] == {"method": "test"}
    assert set(record["dice"]) == {str(v) for v in np.unique(result.warped_labels) if v}
    assert record["folding_percent"] == result.metrics["folding_percent"]
    assert record["versions"]["regnet"] and record["versions"]["torch"]
    png = (out / "overview.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_itk_field_applied_by_simpleitk_reproduces_warped(tmp_path: Path, registration) -> None:
    inputs, result = registration
    out = tmp_path / "out"
    write_registration(out, inputs, result, overview=False)
    field = sitk.ReadImage(str(out / "itk_warp.nii.gz"), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    moving = sitk.ReadImage(str(inputs.moving.path), sitk.sitkFloat64)
    fixed = sitk.ReadImage(str(inputs.fixed.path), sitk.sitkFloat64)
    itk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    itk = itk.transpose(2, 1, 0)
    warped = nib.load(str(out / "warped.nii.gz")).get_fdata()
    # compare where the mapped point lies inside the moving image's outermost voxel centres
    index = np.stack(np.meshgrid(*[np.arange(n) for n in FIXED_SHAPE], indexing="ij"))
    world = (
        np.einsum("ij,j...->i...", FIXED_AFFINE[:3, :3], index)
        + FIXED_AFFINE[:3, 3, None, None, None]
    )
    world = world + result.field.disp_mm[0].numpy()
    inverse = np.linalg.inv(MOVING_AFFINE)
    voxel = np.einsum("ij,j...->i...", inverse[:3, :3], world) + inverse[:3, 3, None, None, None]
    inside = np.all((voxel > 0) & (voxel < np.array(MOVING_SHAPE)[:, None, None, None] - 1), axis=0)
    assert inside.mean() > 0.3 and np.abs(warped[inside]).max() > 50
    np.testing.assert_allclose(warped[inside], itk[inside], rtol=1e-4, atol=1e-3)


def test_existing_results_are_refused_and_left_untouched(tmp_path: Path, registration) -> None:
    inputs, result = registration
    out = tmp_path / "out"
    out.mkdir()
    (out / "warped.nii.gz").write_bytes(b"previous result")
    with pytest.raises(OutputExistsError, match="overwrite=true"):
        write_registration(out, inputs, result)
    assert [p.name for p in out.iterdir()] == ["warped.nii.gz"]
    assert (out / "warped.nii.gz").read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fixed.nii.gz",
        "fl.nii.gz",
        "ml.nii.gz",
        "moving.nii.gz",
        "out",
    ]
    write_registration(out, inputs, result, overwrite=True, overview=False)
    warped = nib.load(str(out / "warped.nii.gz")).get_fdata()
    np.testing.assert_allclose(warped, result.warped[0, 0].numpy(), rtol=1e-6)


def test_a_failure_while_writing_leaves_no_output(
    tmp_path: Path, registration, monkeypatch
) -> None:
    inputs, result = registration

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(regnet.outputs, "save_image", broken)
    with pytest.raises(OSError, match="disk full"):
        write_registration(tmp_path / "out", inputs, result)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_check_output_dir_and_label_dtype(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        check_output_dir(tmp_path / "file", overwrite=True)
    assert label_dtype(np.array([0, 255])) == np.uint8
    assert label_dtype(np.array([-1, 3])) == np.int16
    assert label_dtype(np.array([0, 40000])) == np.int32


def test_save_image_writes_the_pixels_of_torchvision(tmp_path: Path) -> None:
    """regnet's PNG writer (torchvision is slow to import) rounds like torchvision's."""
    tv_utils = pytest.importorskip("torchvision.utils")
    from PIL import Image

    image = torch.rand(3, 11, 17, generator=torch.Generator().manual_seed(0))
    image[:, 0, :3] = torch.tensor([-0.5, 1.5, 0.5 / 255])  # clipped; rounded half up
    save_image(image, tmp_path / "ours.png")
    tv_utils.save_image(image, tmp_path / "torchvision.png")
    ours = np.asarray(Image.open(tmp_path / "ours.png"))
    np.testing.assert_array_equal(ours, np.asarray(Image.open(tmp_path / "torchvision.png")))
    assert ours.shape == (11, 17, 3) and ours.dtype == np.uint8
