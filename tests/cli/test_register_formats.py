"""``register.py`` on MetaImage and NRRD files with oblique directions, and on 2D images.

Each moving image is the fixed content moved by a known shift in physical space, sampled on a
grid of its own; SimpleITK is the reference for what that shift looks like in its files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from regnet.cli.register import main

SHIFT_LPS = np.array([3.0, -2.0, 1.5])  # moving content = fixed content moved by this (LPS mm)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def rotation_30() -> np.ndarray:
    """30° about the axis (0.3, 0.5, 0.8): no image axis is aligned with the scanner's."""
    axis = np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = math.radians(30.0)
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def blobs(points: np.ndarray) -> np.ndarray:
    """Three Gaussian blobs of LPS mm positions ``(..., ndim)``, asymmetric (no rotation of
    them is a symmetry)."""
    centres = np.array([[0.0, 0.0, 0.0], [7.0, -3.0, 2.0], [-4.0, 5.0, -3.0]])
    widths = (6.0, 3.5, 4.0)
    ndim = points.shape[-1]
    total = np.zeros(points.shape[:-1])
    for centre, width, height in zip(centres, widths, (100.0, 70.0, 50.0), strict=True):
        distance = ((points - centre[:ndim]) ** 2).sum(-1)
        total += height * np.exp(-distance / (2 * width**2))
    return total


def sampled_image(size, spacing, origin, direction, shift) -> sitk.Image:
    """``blobs(p - shift)`` sampled at the physical points of an ITK grid, float32."""
    ndim = len(size)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1)
    linear = np.reshape(direction, (ndim, ndim)) * np.asarray(spacing)
    points = index @ linear.T + np.asarray(origin)
    values = blobs(points - np.asarray(shift)).astype(np.float32)
    image = sitk.GetImageFromArray(values.T.copy())  # ITK arrays are (k, j, i)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(np.ravel(direction)))
    return image


def centred_origin(size, spacing, direction) -> tuple[float, ...]:
    """Origin placing the grid's centre at the physical origin."""
    linear = np.reshape(direction, (len(size), len(size))) * np.asarray(spacing)
    return tuple(-(linear @ ((np.asarray(size) - 1) / 2)))


def itk_resampled(moving: sitk.Image, fixed: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    out = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out).T


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_oblique_anisotropic_files_register_to_the_physical_shift(tmp_path: Path, suffix: str):
    size, spacing, direction = (20, 18, 12), (1.5, 1.0, 2.0), rotation_30()
    fixed = sampled_image(size, spacing, centred_origin(size, spacing, direction), direction, 0)
    moving_size, moving_spacing = (22, 22, 22), (1.25, 1.25, 1.25)
    moving = sampled_image(
        moving_size,
        moving_spacing,
        centred_origin(moving_size, moving_spacing, np.eye(3)),
        np.eye(3),
        SHIFT_LPS,
    )
    fixed_path, moving_path = tmp_path / f"fixed{suffix}", tmp_path / f"moving{suffix}"
    sitk.WriteImage(fixed, str(fixed_path))
    sitk.WriteImage(moving, str(moving_path))
    out = tmp_path / "out"
    main(
        [
            f"fixed={fixed_path}",
            f"moving={moving_path}",
            "transform=rigid",
            "spacing=null",
            "levels=2",
            "iterations=[60,40]",
            f"out={out}",
            "device=cpu",
            "overview=false",
        ]
    )
    # the recovered transform, in RAS mm: no rotation, the shift
    world = np.array(json.loads((out / "metrics.json").read_text())["info"]["affine_ras_mm"])
    np.testing.assert_allclose(world[:3, :3], np.eye(3), atol=0.02)
    np.testing.assert_allclose(world[:3, 3], LPS_TO_RAS @ SHIFT_LPS, atol=0.3)
    # SimpleITK reads the outputs on the fixed file's own grid ...
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    np.testing.assert_allclose(warped.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(warped.GetSpacing(), fixed.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(warped.GetDirection(), fixed.GetDirection(), atol=1e-5)
    # ... the ITK field is the physical shift, in LPS as SimpleITK takes it ...
    field = sitk.ReadImage(str(out / "itk_warp.nii.gz"), sitk.sitkVectorFloat64)
    vectors = sitk.GetArrayFromImage(field).reshape(-1, 3)
    assert np.abs(vectors.mean(0) - SHIFT_LPS).max() < 0.3
    # ... and resamples the moving image as SimpleITK's exact translation does
    exact = itk_resampled(moving, fixed, sitk.TranslationTransform(3, tuple(SHIFT_LPS)))
    ours = itk_resampled(moving, fixed, sitk.DisplacementFieldTransform(field))
    regnet_warped = sitk.GetArrayFromImage(warped).T
    inner = (slice(3, -3),) * 3
    before = np.abs(itk_resampled(moving, fixed, sitk.Transform()) - exact)[inner].mean()
    assert np.abs(ours - exact)[inner].mean() < 0.1 * before
    assert np.abs(regnet_warped - exact)[inner].mean() < 0.1 * before


def test_2d_metaimage_pair_registers_to_the_physical_shift(tmp_path: Path):
    angle = math.radians(30.0)
    direction = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    size, spacing = (30, 26), (0.9, 1.3)
    fixed = sampled_image(size, spacing, centred_origin(size, spacing, direction), direction, 0)
    moving_size, moving_spacing = (34, 34), (1.0, 1.0)
    moving = sampled_image(
        moving_size,
        moving_spacing,
        centred_origin(moving_size, moving_spacing, np.eye(2)),
        np.eye(2),
        SHIFT_LPS[:2],
    )
    sitk.WriteImage(fixed, str(tmp_path / "fixed.mha"))
    sitk.WriteImage(moving, str(tmp_path / "moving.mha"))
    out = tmp_path / "out"
    args = [f"fixed={tmp_path / 'fixed.mha'}", f"moving={tmp_path / 'moving.mha'}"]
    main([*args, "transform=rigid", "spacing=null", "levels=2", f"out={out}", "device=cpu"])
    world = np.array(json.loads((out / "metrics.json").read_text())["info"]["affine_ras_mm"])
    assert world.shape == (3, 3)
    np.testing.assert_allclose(world[:2, :2], np.eye(2), atol=0.02)
    np.testing.assert_allclose(world[:2, 2], (LPS_TO_RAS @ SHIFT_LPS)[:2], atol=0.3)
    disp = nib.load(out / "disp_mm.nii.gz")
    assert disp.shape == (30, 26, 1, 1, 2)
    vectors = np.asarray(disp.dataobj)[:, :, 0, 0, :].reshape(-1, 2)  # RAS mm
    assert np.abs(vectors.mean(0) - (LPS_TO_RAS @ SHIFT_LPS)[:2]).max() < 0.3
    field = sitk.ReadImage(str(out / "itk_warp.nii.gz"), sitk.sitkVectorFloat64)
    np.testing.assert_allclose(field.GetDirection(), fixed.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(field.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
    exact = itk_resampled(moving, fixed, sitk.TranslationTransform(2, tuple(SHIFT_LPS[:2])))
    ours = itk_resampled(moving, fixed, sitk.DisplacementFieldTransform(field))
    before = np.abs(itk_resampled(moving, fixed, sitk.Transform()) - exact)[3:-3, 3:-3].mean()
    assert np.abs(ours - exact)[3:-3, 3:-3].mean() < 0.1 * before
    assert (out / "warped.png").is_file() and (out / "overview.png").is_file()


def test_a_2d_and_a_3d_image_are_refused_in_one_line(tmp_path: Path, capsys):
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkFloat32), str(tmp_path / "slice.mha"))
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkFloat32), str(tmp_path / "volume.nrrd"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(
            [f"fixed={tmp_path / 'slice.mha'}", f"moving={tmp_path / 'volume.nrrd'}", f"out={out}"]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path / 'volume.nrrd'}: is 3D, the fixed image")
    assert not out.exists()
