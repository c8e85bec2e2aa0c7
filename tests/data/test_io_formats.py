"""Every format ITK reads: voxels and geometry exactly as SimpleITK reports them, in RAS.

The reference is SimpleITK itself: ``TransformContinuousIndexToPhysicalPoint`` (LPS, x and y
negated to RAS) at chosen indices, and ``GetPixel`` at the same ITK index.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from regnet.data.io import DataError, read_header, read_image
from regnet.spatial.world import affine_to_itk_geometry, itk_geometry_to_affine

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def rotation(axis, degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about ``axis`` (Rodrigues)."""
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = math.radians(degrees)
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


OBLIQUE = rotation((0.3, 0.5, 0.8), 30.0)  # no axis of it is aligned with the scanner's
SPACING = (1.5, 0.8, 2.5)
ORIGIN = (-12.5, 30.25, 7.0)


def oblique_volume(shape=(9, 8, 6)) -> sitk.Image:
    """An int16 3D image (ITK size ``shape``) with oblique direction and anisotropic spacing."""
    values = np.arange(np.prod(shape), dtype=np.int16).reshape(shape[::-1])  # (k, j, i)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(tuple(OBLIQUE.reshape(-1)))
    return image


def oblique_slice(shape=(9, 7)) -> sitk.Image:
    values = (np.arange(np.prod(shape)) % 251).astype(np.uint8).reshape(shape[::-1])
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.7, 1.9))
    image.SetOrigin((4.0, -3.5))
    angle = math.radians(30.0)
    image.SetDirection((math.cos(angle), -math.sin(angle), math.sin(angle), math.cos(angle)))
    return image


def assert_same_as_itk(path: Path, reference: sitk.Image, atol: float = 1e-9) -> None:
    """regnet's array and affine agree with SimpleITK's pixels and physical points."""
    image = read_image(path)
    ndim = reference.GetDimension()
    assert image.array.shape == reference.GetSize()
    size = np.array(reference.GetSize())
    corners = np.stack(np.meshgrid(*[[0, n - 1] for n in size], indexing="ij"), -1)
    indices = [*corners.reshape(-1, ndim).tolist(), (size // 2).tolist()]
    for index in indices:
        expected = np.array(
            reference.TransformContinuousIndexToPhysicalPoint([float(i) for i in index])
        )
        expected = (LPS_TO_RAS[:ndim, :ndim] @ expected)[:ndim]
        point = image.affine @ np.array([*index, *[0] * (3 - ndim), 1.0])
        np.testing.assert_allclose(point[:ndim], expected, atol=atol)
        assert image.array[tuple(index)] == reference.GetPixel([int(i) for i in index])
    header = read_header(path)
    assert header.shape == image.array.shape
    np.testing.assert_allclose(header.affine, image.affine, atol=1e-12)


@pytest.mark.parametrize("suffix", [".mha", ".mhd", ".nrrd", ".nhdr"])
def test_3d_formats_keep_oblique_direction_spacing_and_origin(tmp_path, suffix):
    reference = oblique_volume()
    path = tmp_path / f"image{suffix}"
    sitk.WriteImage(reference, str(path))
    assert_same_as_itk(path, reference)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_2d_formats_keep_their_in_plane_geometry(tmp_path, suffix):
    reference = oblique_slice()
    path = tmp_path / f"slice{suffix}"
    sitk.WriteImage(reference, str(path))
    assert_same_as_itk(path, reference)
    affine = read_image(path).affine
    np.testing.assert_array_equal(affine[:, 2], [0, 0, 1, 0])  # the plane z = 0


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_pictures_read_as_2d_images(tmp_path, suffix):
    reference = sitk.GetImageFromArray((np.arange(35) * 7 % 256).astype(np.uint8).reshape(5, 7))
    path = tmp_path / f"picture{suffix}"
    sitk.WriteImage(reference, str(path))
    image = read_image(path)
    assert image.array.shape == (7, 5)  # (columns i, rows j)
    assert image.array.dtype == np.uint8
    assert_same_as_itk(path, sitk.ReadImage(str(path)))
    np.testing.assert_allclose(image.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))


def test_jpeg_reads_as_a_2d_image(tmp_path):
    columns, rows = np.meshgrid(np.arange(16), np.arange(12))
    values = (8 * columns + 4 * rows).astype(np.uint8)  # (rows, columns)
    path = tmp_path / "photo.jpg"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    image = read_image(path)
    assert image.array.shape == (16, 12)
    assert np.abs(image.array.astype(float) - values.T).mean() < 2.0  # lossy


def test_rgb_is_read_as_luminance_and_other_vectors_are_refused(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)  # (rows, columns, channels)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    path = tmp_path / "colour.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    image = read_image(path)
    assert image.array.shape == (6, 4)
    np.testing.assert_allclose(image.array, 0.299 * 200 + 0.587 * 100 + 0.114 * 50, atol=0.5)
    two = tmp_path / "two.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 6, 2), np.float32), isVector=True), two)
    with pytest.raises(DataError, match=r"two\.mha: has 2 components per voxel"):
        read_image(two)


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """One file per slice with the tags that place it (position, orientation, series)."""
    folder.mkdir()
    direction = image.GetDirection()
    orientation = [direction[0], direction[3], direction[6], direction[1], direction[4]]
    orientation.append(direction[7])
    series = {
        "0008|0060": "CT",
        "0020|000e": "1.2.826.0.1.3680043.2.1125.1.4242",
        "0020|0037": "\\".join(f"{v:.10f}" for v in orientation),
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for tag, value in series.items():
            plane.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        plane.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
        plane.SetMetaData("0020|0013", str(k))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(plane)


def test_dicom_series_folder_reads_with_the_metaimage_geometry(tmp_path):
    reference = oblique_volume()
    sitk.WriteImage(reference, str(tmp_path / "volume.mha"))
    write_dicom_series(reference, tmp_path / "series")
    from_dicom = read_image(tmp_path / "series")
    from_mha = read_image(tmp_path / "volume.mha")
    assert from_dicom.array.shape == from_mha.array.shape == (9, 8, 6)
    np.testing.assert_array_equal(from_dicom.array, from_mha.array)
    np.testing.assert_allclose(from_dicom.affine, from_mha.affine, atol=1e-5)
    assert read_header(tmp_path / "series").shape == (9, 8, 6)


def test_unreadable_inputs_name_the_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    for reader in (read_image, read_header):
        with pytest.raises(DataError, match=r"notes\.txt: not a readable image"):
            reader(text)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: folder holds no DICOM series"):
        read_image(empty)
    with pytest.raises(DataError, match=r"absent\.mha: file not found"):
        read_header(tmp_path / "absent.mha")


@pytest.mark.parametrize("ndim", [2, 3])
def test_itk_geometry_round_trips_through_the_ras_affine(ndim):
    reference = oblique_slice() if ndim == 2 else oblique_volume()
    affine = itk_geometry_to_affine(
        reference.GetOrigin(), reference.GetSpacing(), reference.GetDirection()
    )
    origin, spacing, direction = affine_to_itk_geometry(affine, ndim)
    np.testing.assert_allclose(origin, reference.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(spacing, reference.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(direction, reference.GetDirection(), atol=1e-12)


def test_nifti_and_its_metaimage_copy_read_alike(tmp_path):
    """nibabel (NIfTI) and SimpleITK (MetaImage written by ITK from that NIfTI) give one
    array and one affine: both readers follow the same convention."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ OBLIQUE @ np.diag(SPACING)
    affine[:3, 3] = (4.0, -6.0, 9.5)
    data = np.arange(9 * 8 * 6, dtype=np.float32).reshape(9, 8, 6)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    nib.save(image, tmp_path / "image.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "image.nii.gz")), str(tmp_path / "image.mha"))
    from_nifti, from_mha = read_image(tmp_path / "image.nii.gz"), read_image(tmp_path / "image.mha")
    np.testing.assert_array_equal(from_nifti.array, from_mha.array)
    np.testing.assert_allclose(from_nifti.affine, from_mha.affine, atol=1e-5)
    np.testing.assert_allclose(from_nifti.affine, affine, atol=1e-5)
