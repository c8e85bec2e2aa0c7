"""``register.py`` end to end on NIfTI files in different orientations and spacings."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from phantoms import rigid_matrix
from scipy import ndimage

from regnet.cli.register import main
from regnet.cli.working_grid import (
    carry_matrix,
    on_grid,
    scale_intensities,
    working_grid,
)
from regnet.pipeline import load_volume

SHIFT_MM = np.array([4.0, -3.0, 2.0])  # moving content = fixed content moved by this (RAS mm)


def world_pattern(points):
    """A smooth textured function of RAS mm positions ``(..., 3)``."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return (
        np.sin(0.31 * x + 0.5) * np.cos(0.23 * y - 0.2)
        + np.sin(0.19 * z + 0.13 * x)
        + 0.5 * np.cos(0.27 * y + 0.21 * z)
    )


def write_image(path, affine, shape, shift=(0.0, 0.0, 0.0)):
    """Sample ``world_pattern(p - shift)`` on the grid of ``affine``/``shape``."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    points = index @ affine[:3, :3].T + affine[:3, 3]
    nib.save(
        nib.Nifti1Image(world_pattern(points - np.asarray(shift)).astype(np.float32), affine), path
    )
    return path


@pytest.fixture
def pair(tmp_path):
    # fixed: LPS-like axes (x and y flipped), 2 mm; moving: RAS, 2.5 mm, larger field of view
    fixed_affine = np.array(
        [[-2.0, 0, 0, 18.0], [0, -2.0, 0, 20.0], [0, 0, 2.0, -16.0], [0, 0, 0, 1]]
    )
    moving_affine = np.array(
        [[2.5, 0, 0, -26.0], [0, 2.5, 0, -28.0], [0, 0, 2.5, -24.0], [0, 0, 0, 1]]
    )
    fixed = write_image(tmp_path / "fixed.nii.gz", fixed_affine, (18, 20, 16))
    moving = write_image(tmp_path / "moving.nii.gz", moving_affine, (22, 24, 20), SHIFT_MM)
    return fixed, moving, fixed_affine


def test_working_grid_is_ras_over_the_fixed_field_of_view(pair):
    fixed_path, _, affine = pair
    grid_affine, shape = working_grid(load_volume(fixed_path), 1.0)
    assert shape == (35, 39, 31)
    np.testing.assert_allclose(grid_affine[:3, :3], np.eye(3))
    # the corners of the fixed image are corners of the working grid
    np.testing.assert_allclose(grid_affine[:3, 3], affine[:3, :3] @ [17, 19, 0] + affine[:3, 3])


def test_register_recovers_a_world_translation(pair, tmp_path):
    fixed, moving, fixed_affine = pair
    out = tmp_path / "out"
    main(
        [
            f"fixed={fixed}",
            f"moving={moving}",
            "transform=rigid",
            "spacing=2",
            f"out={out}",
            "device=cpu",
            "levels=2",
            "iterations=[60,40]",
        ]
    )
    disp = nib.load(out / "disp_mm.nii.gz")
    np.testing.assert_allclose(disp.affine, fixed_affine, atol=1e-5)
    vectors = np.asarray(disp.dataobj)[..., 0, :]  # (I, J, K, 3) RAS mm
    inner = vectors[3:-3, 3:-3, 3:-3].reshape(-1, 3)
    assert np.linalg.norm(inner - SHIFT_MM, axis=1).mean() < 0.4
    warped = nib.load(out / "warped.nii.gz")
    np.testing.assert_allclose(warped.affine, fixed_affine, atol=1e-5)
    expected = np.asarray(nib.load(fixed).dataobj)
    residual = np.abs(np.asarray(warped.dataobj) - expected)[3:-3, 3:-3, 3:-3]
    assert residual.mean() < 0.1 * np.abs(expected).mean()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["folding_percent"] == 0.0
    assert metrics["info"]["method"] == "register:rigid"
    world = np.array(metrics["info"]["affine_ras_mm"])
    np.testing.assert_allclose(world[:3, :3], np.eye(3), atol=0.02)
    np.testing.assert_allclose(world[:3, 3], SHIFT_MM, atol=0.5)
    # affine.tfm holds the same map between LPS points (ITK's AffineTransform parameters)
    lines = (out / "affine.tfm").read_text().splitlines()
    assert lines[2] == "Transform: AffineTransform_double_3_3"
    parameters = np.array(lines[3].split()[1:], float)
    flip = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(parameters[:9].reshape(3, 3), flip @ world[:3, :3] @ flip, atol=1e-9)
    np.testing.assert_allclose(parameters[9:], flip @ world[:3, 3], atol=1e-9)


def test_a_thick_slice_scan_is_registered_on_a_per_axis_working_grid(tmp_path):
    """A 1.25 x 1.25 x 4 mm fixed scan (axes stored as L, P, S) against a 1 mm moving one:
    spacing=auto works at 1.5 x 1.5 x 2 mm and recovers the world translation."""
    fixed_affine = np.array(
        [[-1.25, 0, 0, 18.0], [0, -1.25, 0, 20.0], [0, 0, 4.0, -14.0], [0, 0, 0, 1]]
    )
    fixed = write_image(tmp_path / "fixed.nii.gz", fixed_affine, (30, 32, 8))
    moving_affine = np.array(
        [[1.0, 0, 0, -26.0], [0, 1.0, 0, -28.0], [0, 0, 1.0, -22.0], [0, 0, 0, 1]]
    )
    moving = write_image(tmp_path / "moving.nii.gz", moving_affine, (52, 56, 44), SHIFT_MM)
    out = tmp_path / "out"
    main([f"fixed={fixed}", f"moving={moving}", "transform=rigid", f"out={out}", "device=cpu"])
    metrics = json.loads((out / "metrics.json").read_text())
    grid = np.array(metrics["info"]["working_grid"]["affine"])
    np.testing.assert_allclose(np.linalg.norm(grid[:3, :3], axis=0), [1.5, 1.5, 2.0])
    assert metrics["info"]["working_grid"]["shape"] == [25, 27, 15]
    world = np.array(metrics["info"]["affine_ras_mm"])
    np.testing.assert_allclose(world[:3, 3], SHIFT_MM, atol=0.5)


def test_existing_output_is_refused(pair, tmp_path, capsys):
    fixed, moving, _ = pair
    out = tmp_path / "taken"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit) as stop:
        main([f"fixed={fixed}", f"moving={moving}", f"out={out}"])
    assert stop.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "overwrite=true" in message
    assert len(message.splitlines()) == 1


def test_missing_file_gives_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(SystemExit) as stop:
        main([f"fixed={missing}", f"moving={missing}", f"out={tmp_path / 'out'}"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {missing}: file not found"
    assert not (tmp_path / "out").exists()


def test_unknown_transform_is_named(pair, tmp_path, capsys):
    fixed, moving, _ = pair
    with pytest.raises(SystemExit):
        main([f"fixed={fixed}", f"moving={moving}", "transform=spline", f"out={tmp_path / 'o'}"])
    assert capsys.readouterr().err.startswith("error: transform=spline: expected one of rigid")


def test_resampling_onto_a_coarser_grid_is_anti_aliased(tmp_path):
    # a 1 mm checkerboard (the Nyquist pattern) aliases onto a 2 mm grid unless smoothed first
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    index = np.indices((24, 24, 24)).sum(0)
    path = tmp_path / "fine.nii.gz"
    nib.save(nib.Nifti1Image((index % 2).astype(np.float32) + 1.0, affine), path)
    volume = load_volume(path)
    grid_affine, shape = working_grid(volume, 2.0)
    plain = on_grid(volume, grid_affine, shape)[0, 0, 2:-2, 2:-2, 2:-2]
    smooth = on_grid(volume, grid_affine, shape, anti_alias=True)[0, 0, 2:-2, 2:-2, 2:-2]
    assert torch.all(plain == 1.0)  # every 2 mm sample lands on the checkers of value 1
    assert float(smooth.std()) < 0.05 and abs(float(smooth.mean()) - 1.5) < 0.05
    # on a grid as fine as the image, anti-aliasing changes nothing
    same_affine, same_shape = working_grid(volume, 1.0)
    assert torch.equal(
        on_grid(volume, same_affine, same_shape, anti_alias=True),
        on_grid(volume, same_affine, same_shape),
    )


@pytest.mark.parametrize("ndim", [2, 3])
def test_cubic_resampling_onto_a_rotated_grid_blurs_less_than_linear(tmp_path, ndim):
    """A smooth image sampled onto a grid rotated by 20 degrees and shifted by a fraction of a
    voxel: cubic B-spline interpolation stays closer to the analytic values than linear, and on
    the image's own grid both return the voxels unchanged."""
    shape = (40,) * ndim
    index = np.indices(shape).astype(np.float64)
    wave = lambda points: np.cos(points[0] / 2.5) * np.sin(points[1] / 3.0) + 2.0  # noqa: E731
    path = tmp_path / "smooth.nii.gz"
    nib.save(nib.Nifti1Image(wave(index).astype(np.float32), np.eye(4)), path)
    volume = load_volume(path)
    angle = np.radians(20.0)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    rotation[:3, 3] = [12.3, 4.6, 0.0 if ndim == 2 else 10.4]
    grid_shape = (14,) * ndim
    grid_index = np.indices(grid_shape).reshape(ndim, -1).astype(np.float64)
    world = rotation[:ndim, :ndim] @ grid_index + rotation[:ndim, 3:4]
    truth = wave(world).reshape(grid_shape)
    errors = {
        mode: np.abs(on_grid(volume, rotation, grid_shape, mode)[0, 0].numpy() - truth).max()
        for mode in ("linear", "cubic")
    }
    assert errors["cubic"] < errors["linear"] / 4
    own_affine, own_shape = working_grid(volume, None)
    for mode in ("linear", "cubic"):
        resampled = on_grid(volume, own_affine, own_shape, mode)[0, 0].numpy()
        np.testing.assert_allclose(resampled, wave(index), atol=1e-5)


def test_intensity_scaling_keeps_a_stripped_brains_dark_tissue_whatever_the_rounding():
    """A skull-stripped image (zero background, its darkest percent well above zero) scales the
    same with exact zeros around the brain and with resampling's 1e-13 values there: the lower
    bound is zero, not the dimmest percent of the brain, so its darkest tissue stays above the
    background; a negative lower percentile (spline undershoot, CT) is kept."""
    generator = torch.Generator().manual_seed(0)
    image = torch.zeros(1, 1, 20, 20, 20)
    brain = (slice(None), slice(None), slice(4, 16), slice(4, 16), slice(4, 16))
    image[brain] = 50.0 + 150.0 * torch.rand(1, 1, 12, 12, 12, generator=generator)
    rounded = image.clone()
    rounded[:, :, 3, 4:16, 4:16] = 1e-13  # a rim of rounding on one face
    exact, noisy = scale_intensities(image, (1.0, 99.0)), scale_intensities(rounded, (1.0, 99.0))
    torch.testing.assert_close(exact, noisy, rtol=0, atol=2e-3)
    darkest = exact[brain].min()
    assert 0.2 < darkest < 0.3, darkest  # 50 / ~199: not clipped onto the background's 0
    assert exact[0, 0, 0, 0, 0] == 0.0
    signed = image.clone()
    signed[brain] -= 100.0  # values from -50: the lower percentile is below 0 and clips
    low, high = np.percentile(signed[signed != 0].numpy(), [1.0, 99.0])
    expected = ((signed - low) / (high - low)).clamp(0, 1)
    assert low < 0 and signed[brain].min() < low
    torch.testing.assert_close(scale_intensities(signed, (1.0, 99.0)), expected)


def test_a_voxel_matrix_carried_to_another_grid_maps_the_same_world_points():
    source = np.diag([1.5, 1.5, 2.0, 1.0])
    source[:3, 3] = [-30.0, -20.0, 10.0]
    target = np.diag([-1.25, 1.25, 1.25, 1.0])[:, [1, 0, 2, 3]]  # axes swapped, one flipped
    target[:3, 3] = [40.5, -20.2, 9.0]
    matrix = torch.from_numpy(rigid_matrix((10.0, -4.0, 6.0), (2.0, -1.0, 3.0), (8, 9, 7)))
    carried = carry_matrix(matrix[None], source, target)[0].numpy()
    voxels = np.vstack([np.random.default_rng(0).uniform(0, 30, (3, 12)), np.ones((1, 12))])
    through_source = source @ matrix.numpy() @ np.linalg.inv(source) @ target @ voxels
    np.testing.assert_allclose(target @ carried @ voxels, through_source, atol=1e-9)


def test_affine_tfm_resamples_like_regnet_in_simpleitk_and_ants(tmp_path):
    """``affine.tfm`` maps fixed LPS points to moving ones: SimpleITK's ``Resample(moving, fixed,
    ReadTransform("affine.tfm"))``, and ANTs' ``antsApplyTransforms -t affine.tfm`` (antspyx's
    ``apply_transforms``), reproduce ``warped.nii.gz`` on an oblique, anisotropic fixed grid."""
    sitk = pytest.importorskip("SimpleITK")
    angle = np.deg2rad(20)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    fixed_affine = np.eye(4)
    fixed_affine[:3, :3] = np.diag([-1.0, 1.0, 1.0]) @ rotation @ np.diag([2.0, 2.4, 3.0])
    fixed_affine[:3, 3] = [20.0, -22.0, -18.0]
    moving_affine = np.diag([2.5, 2.5, 2.5, 1.0])
    moving_affine[:3, 3] = [-30.0, -34.0, -30.0]
    fixed = write_image(tmp_path / "fixed.nii.gz", fixed_affine, (18, 16, 12))
    moving = write_image(tmp_path / "moving.nii.gz", moving_affine, (24, 28, 24), SHIFT_MM)
    out = tmp_path / "out"
    args = [f"fixed={fixed}", f"moving={moving}", "transform=affine", "spacing=3", "levels=1"]
    main([*args, "iterations=[30]", f"out={out}", "device=cpu", "overview=false"])

    warped = np.asarray(nib.load(out / "warped.nii.gz").dataobj)
    transform = sitk.ReadTransform(str(out / "affine.tfm"))
    assert transform.GetName() == "AffineTransform"
    itk_warped = sitk.Resample(
        sitk.ReadImage(str(moving)), sitk.ReadImage(str(fixed)), transform, sitk.sitkLinear, 0.0
    )
    itk_array = sitk.GetArrayFromImage(itk_warped).transpose(2, 1, 0)  # ITK arrays are (k, j, i)
    # away from the moving image's edge, where zero padding blends in differently
    inside = ndimage.binary_erosion((warped != 0) & (itk_array != 0), iterations=2)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(itk_array[inside], warped[inside], atol=1e-3)
    ants = pytest.importorskip("ants")
    ants_warped = ants.apply_transforms(
        ants.image_read(str(fixed)),
        ants.image_read(str(moving)),
        transformlist=[str(out / "affine.tfm")],
        interpolator="linear",
    ).numpy()
    np.testing.assert_allclose(ants_warped[inside], warped[inside], atol=1e-3)


def test_deformable_run_writes_its_affine_stage(pair, tmp_path):
    fixed, moving, _ = pair
    out = tmp_path / "out"
    args = [f"fixed={fixed}", f"moving={moving}", "transform=svf", "spacing=3", "levels=1"]
    settings = ["iterations=[5]", "affine_iterations=[20]", "start_check=false", "overview=false"]
    main([*args, *settings, "polish_iterations=2", f"out={out}", "device=cpu"])
    metrics = json.loads((out / "metrics.json").read_text())
    world = np.array(metrics["info"]["affine_ras_mm"])
    assert np.abs(world[:3, 3]).max() > 0.5  # the stage moved the image
    # the time of each stage: start search, affine, sampled SVF steps, dense steps asked for
    seconds = metrics["info"]["level_seconds"]
    assert list(seconds) == ["search/level0", "affine/level0", "svf/level0", "polish/level0"]
    assert all(value > 0 for value in seconds.values())
    assert sum(seconds.values()) <= metrics["seconds"]
    steps = metrics["info"]["level_steps"]
    assert steps["affine/level0"] == 20 and steps["svf/level0"] == 5 and steps["polish/level0"] == 2
    parameters = np.array((out / "affine.tfm").read_text().splitlines()[3].split()[1:], float)
    flip = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(parameters[9:], flip @ world[:3, 3], atol=1e-9)


@pytest.mark.parametrize(
    ("voxel", "expected"),
    [
        ((1.0, 1.0, 1.0), (1.5, 1.5, 1.5)),
        ((1.0, 1.0, 5.0), (1.5, 1.5, 2.0)),
        ((1.8, 1.8, 1.8), (1.8, 1.8, 1.8)),
        ((2.0,) * 3, (2.0, 2.0, 2.0)),
        ((3.0, 0.9, 1.7), (2.0, 1.5, 1.7)),
    ],
)
def test_auto_spacing_is_each_axis_voxel_size_within_1_5_to_2_mm(tmp_path, voxel, expected):
    from regnet.cli.working_grid import working_spacing

    path = tmp_path / "image.nii.gz"
    nib.save(
        nib.Nifti1Image(np.random.rand(6, 6, 6).astype(np.float32), np.diag([*voxel, 1])), path
    )
    volume = load_volume(path)
    assert working_spacing("auto", volume) == pytest.approx(expected)
    assert working_spacing(None, volume) is None and working_spacing(3, volume) == 3.0
    affine, shape = working_grid(volume, working_spacing("auto", volume))
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), expected)
    extent = [(n - 1) * g for n, g in zip(shape, expected, strict=True)]
    np.testing.assert_allclose(extent, [5 * v for v in voxel], atol=max(expected) / 2)


def test_auto_spacing_keeps_fine_pixels_of_2d_images(tmp_path):
    """2D: the image's own pixel size below 2 mm, 2 mm above."""
    from regnet.cli.working_grid import working_spacing

    for pixel, expected in (((1.0, 0.5), (1.0, 0.5)), ((3.0, 1.0), (2.0, 1.0))):
        path = tmp_path / f"slice{pixel[0]}.nii.gz"
        image = np.random.rand(8, 8).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.diag([*pixel, 1.0, 1.0])), path)
        assert working_spacing("auto", load_volume(path)) == pytest.approx(expected)


def test_auto_spacing_follows_the_axes_onto_the_working_grid(tmp_path):
    """A sagittal thick-slice scan stored with its 5 mm axis first (L-R) and its in-plane axes
    as S, A: the working grid (RAS order) is 2 mm along R, 1.5 mm along A and S."""
    from regnet.cli.working_grid import working_spacing

    affine = np.zeros((4, 4))
    affine[0, 0], affine[2, 1], affine[1, 2], affine[3, 3] = 5.0, 1.0, 1.0, 1.0
    path = tmp_path / "sagittal.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(8, 30, 20).astype(np.float32), affine), path)
    volume = load_volume(path)
    assert working_spacing("auto", volume) == pytest.approx((2.0, 1.5, 1.5))
    grid_affine, shape = working_grid(volume, working_spacing("auto", volume))
    assert shape == (19, 14, 20)  # 35 mm / 2, 19 mm / 1.5, 29 mm / 1.5 voxels, rounded, + 1


def test_auto_spacing_and_grid_spacing_along_image_axes_in_2d(tmp_path):
    """2D: a 1 x 5 mm image stored with its axes swapped (first axis A-P at 5 mm, second axis
    R-L at 1 mm) gets a 1 x 2 mm working grid in RAS order (R, A), and the grid's spacing
    along each stored image axis is 2 mm along the first, 1 mm along the second."""
    from regnet.cli.working_grid import grid_spacing_along, working_spacing

    affine = np.zeros((4, 4))
    affine[1, 0], affine[0, 1], affine[2, 2], affine[3, 3] = 5.0, 1.0, 1.0, 1.0
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(9, 30).astype(np.float32), affine), path)
    volume = load_volume(path)
    assert volume.ndim == 2
    spacing = working_spacing("auto", volume)
    assert spacing == pytest.approx((1.0, 2.0))
    grid_affine, shape = working_grid(volume, spacing)
    assert shape == (30, 21)  # 29 mm / 1 + 1, 40 mm / 2 + 1
    np.testing.assert_allclose(np.linalg.norm(grid_affine[:3, :2], axis=0), [1.0, 2.0])
    assert grid_spacing_along(grid_affine, volume.affine, 2) == pytest.approx([2.0, 1.0])


def test_anti_aliasing_smooths_each_image_axis_to_the_grid_spacing_along_it(tmp_path):
    """Onto a 1.5 x 1.5 x 2 mm grid, a 1 mm image is smoothed by sqrt(1.5^2 - 1) mm FWHM across
    the first two axes and sqrt(2^2 - 1) mm along the third, also when the grid is rotated by
    90 degrees about the third axis; a 5 mm axis is not smoothed."""
    from regnet.cli.working_grid import grid_spacing_along

    grid = np.diag([1.5, 1.5, 2.0, 1.0])
    assert grid_spacing_along(grid, np.eye(4), 3) == pytest.approx([1.5, 1.5, 2.0])
    swapped = np.array([[0, 2.0, 0, 0], [1.5, 0, 0, 0], [0, 0, 1.5, 0], [0, 0, 0, 1]])
    assert grid_spacing_along(swapped, np.eye(4), 3) == pytest.approx([2.0, 1.5, 1.5])
    oblique = np.eye(4)
    oblique[:2, :2] = np.array([[1.0, -1.0], [1.0, 1.0]]) / np.sqrt(2)
    expected = np.sqrt((1.5**2 + 2.0**2) / 2)
    assert grid_spacing_along(swapped, oblique, 3)[:2] == pytest.approx([expected] * 2)
    # on_grid smooths each image axis by exactly those widths before resampling
    from regnet.spatial.smooth import gaussian_smooth

    path = tmp_path / "noise.nii.gz"
    data = np.random.default_rng(0).random((20, 22, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    volume = load_volume(path)
    for grid_affine, widths in ((grid, [1.5, 1.5, 2.0]), (swapped, [2.0, 1.5, 1.5])):
        sigmas = [np.sqrt(g**2 - 1.0) / (2 * np.sqrt(2 * np.log(2))) for g in widths]
        smoothed = dataclasses.replace(volume, data=gaussian_smooth(volume.data.float(), sigmas))
        expected = on_grid(smoothed, grid_affine, (9, 10, 8))
        actual = on_grid(volume, grid_affine, (9, 10, 8), anti_alias=True)
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("spacing=fine", "error: spacing=fine: must be auto, null or a"),
        ("mind_sigma=-1", "error: mind_sigma=-1: must be auto or a number >= 0"),
        ("exact_svf_gradient=2", "error: exact_svf_gradient=2: must be auto, true or false"),
    ],
)
def test_a_setting_out_of_range_is_named(pair, tmp_path, capsys, setting, message):
    fixed, moving, _ = pair
    with pytest.raises(SystemExit):
        main([f"fixed={fixed}", f"moving={moving}", setting, f"out={tmp_path / 'o'}"])
    assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("grid", "image", "expected"),
    [
        ((2.0, 2.0, 2.0), (2.0, 2.0, 2.0), (0.3, 0.3, 0.3)),  # the scan's own grid: no blur yet
        ((2.0, 2.0, 2.0), (2.0, 2.0, 5.0), (0.3, 0.3, 0.3)),  # thick slices are upsampled
        ((1.5, 1.5, 1.5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),  # anti-aliasing: 0.316 voxels
        ((2.0, 2.0), (1.8, 2.0), (0.2361, 0.3)),  # 0.3 less 0.1851 voxels, in quadrature
    ],
)
def test_mind_sigma_auto_tops_the_anti_aliasing_up_to_the_target_blur(grid, image, expected):
    from regnet.cli.register_settings import MIND_BLUR, mind_sigma

    assert MIND_BLUR == 0.3
    assert mind_sigma("auto", grid, image) == pytest.approx(expected, abs=1e-4)
    assert mind_sigma(0.5, grid, image) == (0.5,) * len(grid)


def test_register_py_smooths_before_mind_on_the_scans_own_grid(pair, tmp_path):
    """On the fixed image's own grid ``mind_sigma=auto`` smooths by 0.3 voxels; metrics.json
    records the ``mind`` term's options; ``mind_sigma=0`` leaves them out."""
    fixed, moving, _ = pair
    quick = ["iterations=[2,2,1]", "affine_iterations=[1,1,0]", "search_iterations=1"]
    args = [f"fixed={fixed}", f"moving={moving}", "spacing=null", "device=cpu", *quick]
    main([*args, f"out={tmp_path / 'auto'}", "overview=false"])
    info = json.loads((tmp_path / "auto" / "metrics.json").read_text())["info"]
    assert info["loss_options"] == {"mind": {"sigma": [0.3, 0.3, 0.3]}}
    assert info["exact_svf_gradient"] == (info["loss"] == "lncc+grad")  # the choice, recorded
    main([*args, "mind_sigma=0", f"out={tmp_path / 'none'}", "overview=false"])
    assert (
        json.loads((tmp_path / "none" / "metrics.json").read_text())["info"]["loss_options"] is None
    )


def test_the_command_line_ends_with_every_output_written_and_its_summary_printed(pair, tmp_path):
    """``python register.py`` ends its process without the interpreter's teardown
    (:func:`regnet.cli.common.end_process`): exit status 0, the summary line on stdout, every
    file complete."""
    fixed, moving, _ = pair
    out = tmp_path / "cli"
    script = Path(__file__).resolve().parents[2] / "register.py"
    command = [sys.executable, str(script), f"fixed={fixed}", f"moving={moving}", f"out={out}"]
    command += ["transform=rigid", "levels=1", "iterations=[5]", "init=identity"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"{out}: folding 0.000 %")
    assert run.stdout.endswith(" s\n")
    metrics = json.loads((out / "metrics.json").read_text())
    for name in metrics["outputs"].values():
        assert (out / name).stat().st_size > 0
    assert nib.load(out / "warped.nii.gz").get_fdata().shape == (18, 20, 16)


@pytest.mark.parametrize(("spacing", "finest"), [(1.5, 25), (2.0, 15)])
def test_metrics_record_the_finest_svf_steps_the_working_grid_chose(
    pair, tmp_path, spacing, finest
):
    fixed, moving, _ = pair
    out = tmp_path / "out"
    args = [f"fixed={fixed}", f"moving={moving}", f"spacing={spacing}", "overview=false"]
    main([*args, "affine_iterations=[2,2,0]", "search_iterations=1", f"out={out}", "device=cpu"])
    steps = json.loads((out / "metrics.json").read_text())["info"]["level_steps"]
    assert steps["svf/level2"] == finest and steps["svf/level0"] == 60
