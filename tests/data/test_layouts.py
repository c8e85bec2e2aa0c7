"""Dataset layouts: pair lists, folders and Learn2Reg, caching, augmentation, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from regnet.data.augment import build_augmentation
from regnet.data.io import DataError, voxel_to_world
from regnet.data.layouts import FolderDataset, Learn2RegDataset, PairListDataset

SHAPE = (12, 10, 8)
AFFINES = [
    np.diag([1.0, 1.0, 1.0, 1.0]),
    np.diag([-1.0, 1.0, 1.0, 1.0]),
    np.diag([-1.0, -1.0, 1.0, 1.0]),
]  # RAS, LAS, LPS
PREPROCESS = {"spacing": 1.0, "shape": (12, 12, 8)}


def write_subject(folder: Path, name: str, number: int, affine=None) -> dict[str, str]:
    """Image with a cube whose position encodes ``number``; its label map marks the cube
    with ``number``. Returns the written paths relative to ``folder``."""
    affine = AFFINES[number % 3] if affine is None else affine
    cube = np.zeros(SHAPE, np.float32)
    cube[2 + number : 6 + number, 3:7, 2:6] = 1
    for sub, array in (("images", 50 * cube + 5), ("labels", number * cube.astype(np.int16))):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine), str(folder / sub / name))
    return {"image": f"images/{name}", "label": f"labels/{name}"}


def cube_number(item: dict, role: str) -> int:
    """Which subject an item's image came from: the label value under its bright cube."""
    labels = item[f"{role}_label"][0]
    bright = item[role][0] > 0.5
    values = labels[bright]
    assert (values == values.mode().values).float().mean() > 0.9  # label stays on the cube
    return int(values.mode().values)


def one_line_error(function, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        function(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_pair_list_csv_and_json(tmp_path):
    for number in (1, 2, 3):
        write_subject(tmp_path / "data", f"s{number}.nii.gz", number)
    (tmp_path / "data" / "s1.csv").write_text("x,y,z\n1,2,3\n4,5,6\n")
    (tmp_path / "data" / "s2.csv").write_text("x,y,z\n-1,-2,-3\n7,8,9\n")
    rows = [
        "fixed,moving,fixed_label,moving_label,fixed_landmarks,moving_landmarks",
        "images/s1.nii.gz,images/s2.nii.gz,labels/s1.nii.gz,labels/s2.nii.gz,s1.csv,s2.csv",
        "images/s3.nii.gz,images/s1.nii.gz,labels/s3.nii.gz,labels/s1.nii.gz,,",
    ]
    (tmp_path / "data" / "pairs.csv").write_text("\n".join(rows) + "\n")
    dataset = PairListDataset(tmp_path / "data" / "pairs.csv", **PREPROCESS)
    assert len(dataset) == 2 and len(dataset.subjects) == 4  # s1 with and without landmarks
    first, second = dataset[0], dataset[1]
    assert (cube_number(first, "fixed"), cube_number(first, "moving")) == (1, 2)
    assert (cube_number(second, "fixed"), cube_number(second, "moving")) == (3, 1)
    assert first["fixed_path"].endswith("s1.nii.gz") and first["moving_path"].endswith("s2.nii.gz")
    np.testing.assert_allclose(first["moving_landmarks"], [[-1, -2, -3], [7, 8, 9]])
    assert "fixed_landmarks" not in second
    assert first["fixed_affine"].dtype == torch.float64 and first["fixed"].shape == (1, 12, 12, 8)

    listed = [{"fixed": "data/images/s2.nii.gz", "moving": "data/images/s3.nii.gz"}]
    (tmp_path / "pairs.json").write_text(json.dumps(listed))
    dataset = PairListDataset(tmp_path / "pairs.json", root=tmp_path, **PREPROCESS)
    assert dataset[0]["fixed_path"].endswith("s2.nii.gz") and "fixed_label" not in dataset[0]


def test_pair_list_bad_rows_name_row_and_file(tmp_path):
    folder = tmp_path / "data"
    write_subject(folder, "good.nii.gz", 1)
    images = folder / "images"
    nib.save(
        nib.Nifti1Image(np.ones((*SHAPE, 3), np.float32), np.eye(4)), str(images / "4d.nii.gz")
    )
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.int16), np.eye(4)), str(images / "lab.nii.gz"))
    nan = np.ones(SHAPE, np.float32)
    nan[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(images / "nan.nii.gz"))
    cases = {
        "images/missing.nii.gz,": "missing.nii.gz",
        "images/4d.nii.gz,": "4d.nii.gz",
        "images/good.nii.gz,images/lab.nii.gz": "lab.nii.gz",
    }
    for moving_label, culprit in cases.items():
        moving, label = moving_label.split(",")
        rows = ["fixed,moving,moving_label", "images/good.nii.gz,images/good.nii.gz,"]
        rows.append(f"images/good.nii.gz,{moving},{label}")
        (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
        message = one_line_error(PairListDataset, folder / "pairs.csv", **PREPROCESS)
        assert "pairs.csv row 2" in message and culprit in message, message
    # NaN/Inf voxels are found when the row is loaded (at construction with a memory cache)
    (folder / "pairs.csv").write_text("fixed,moving\nimages/good.nii.gz,images/nan.nii.gz\n")
    dataset = PairListDataset(folder / "pairs.csv", **PREPROCESS)
    message = one_line_error(dataset.__getitem__, 0)
    assert "pairs.csv row 1" in message and "nan.nii.gz" in message and "NaN" in message
    message = one_line_error(PairListDataset, folder / "pairs.csv", cache="memory", **PREPROCESS)
    assert "pairs.csv row 1" in message and "nan.nii.gz" in message


def test_folder_random_validation_and_atlas_pairs(tmp_path):
    for number in range(1, 6):
        write_subject(tmp_path, f"sub{number}.nii.gz", number)
    train = FolderDataset(tmp_path, split="train", num_val=2, seed=3, **PREPROCESS)
    assert len(train) == 3 and train.unlimited
    pairs = [train.pair_indices(i) for i in range(60)]
    assert all(f != m for f, m in pairs) and {f for f, _ in pairs} == {0, 1, 2}
    assert len(set(pairs)) == 6  # every ordered pair of the 3 training subjects appears
    assert pairs == [train.pair_indices(i) for i in range(60)]  # deterministic per index
    item = train[4]
    assert {cube_number(item, "fixed"), cube_number(item, "moving")} <= {1, 2, 3}

    val = FolderDataset(tmp_path, split="val", num_val=2, num_pairs=4, **PREPROCESS)
    assert not val.unlimited and len(val) == 4
    assert {(cube_number(val[i], "fixed"), cube_number(val[i], "moving")) for i in range(4)} == {
        (4, 5),
        (5, 4),
    }

    atlas = FolderDataset(
        tmp_path,
        split="all",
        atlas="images/sub5.nii.gz",
        atlas_label="labels/sub5.nii.gz",
        **PREPROCESS,
    )
    got = [(cube_number(atlas[i], "fixed"), cube_number(atlas[i], "moving")) for i in range(4)]
    assert got == [(5, 1), (5, 2), (5, 3), (5, 4)]


def test_folder_caches_give_the_same_items(tmp_path):
    for number in range(1, 4):
        write_subject(tmp_path, f"sub{number}.nii.gz", number)
    kwargs = {"split": "all", "atlas": "images/sub1.nii.gz", **PREPROCESS}
    plain = FolderDataset(tmp_path, **kwargs)[1]
    for cache in ("memory", "disk"):
        cached = FolderDataset(tmp_path, cache=cache, cache_dir=tmp_path / "cache", **kwargs)[1]
        for key in ("fixed", "moving", "fixed_label", "moving_label", "fixed_affine"):
            assert torch.equal(plain[key], cached[key]), (cache, key)
    assert any((tmp_path / "cache").iterdir())


def test_learn2reg_dataset_json(tmp_path):
    entries = []
    for number in range(1, 5):
        paths = write_subject(tmp_path, f"L2R_{number:04d}_0000.nii.gz", number, np.eye(4))
        keypoints = tmp_path / "keypointsTr" / f"L2R_{number:04d}_0000.csv"
        keypoints.parent.mkdir(exist_ok=True)
        keypoints.write_text(f"{number},2,3\n0,0,{number}\n")
        entries.append(
            {
                "image": "./" + paths["image"],
                "label": "./" + paths["label"],
                "keypoints": f"./keypointsTr/L2R_{number:04d}_0000.nii.gz",  # L2R naming quirk
            }
        )
    info = {
        "tensorImageShape": {"0": [12, 12, 8]},
        "training": entries,
        "training_paired_images": [],
        "registration_val": [
            {"fixed": entries[3]["image"], "moving": entries[2]["image"]},
        ],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    val = Learn2RegDataset(tmp_path / "dataset.json", split="val", spacing=1.0)
    item = val[0]
    assert item["fixed"].shape == (1, 12, 12, 8)  # tensorImageShape is the default shape
    assert (cube_number(item, "fixed"), cube_number(item, "moving")) == (4, 3)
    # keypoints are voxel indices of the file, converted to RAS mm with its affine (identity)
    np.testing.assert_allclose(item["fixed_landmarks"], [[4, 2, 3], [0, 0, 4]])
    train = Learn2RegDataset(tmp_path / "dataset.json", split="train", spacing=1.0)
    assert train.unlimited and len(train.subjects) == 2  # validation images left out
    numbers = {cube_number(train[i], role) for i in range(4) for role in ("fixed", "moving")}
    assert numbers == {1, 2}

    info["training_paired_images"] = [
        {"fixed": entries[1]["image"], "moving": entries[0]["image"]},
        {"fixed": entries[3]["image"], "moving": entries[0]["image"]},  # touches validation
    ]
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    paired = Learn2RegDataset(tmp_path / "dataset.json", split="train", spacing=1.0)
    assert len(paired) == 1 and not paired.unlimited
    assert (cube_number(paired[0], "fixed"), cube_number(paired[0], "moving")) == (2, 1)


def test_augmentation_moves_label_with_image(tmp_path):
    for number in range(1, 3):
        write_subject(tmp_path, f"sub{number}.nii.gz", number)
    plain = FolderDataset(tmp_path, split="all", atlas="images/sub1.nii.gz", **PREPROCESS)
    augmented = FolderDataset(
        tmp_path,
        split="all",
        atlas="images/sub1.nii.gz",
        seed=5,
        **PREPROCESS,
        augmentation=build_augmentation(3, rotate_deg=20, scale=0.15, elastic_prob=1.0),
    )
    assert augmented.unlimited
    before, after = plain[0], augmented[0]
    assert not torch.equal(before["moving"], after["moving"])
    assert cube_number(after, "moving") == 2 and after["moving_label"].dtype == torch.int64
    assert torch.equal(after["moving_affine"], before["moving_affine"])
    again = augmented[0]
    assert torch.equal(again["moving"], after["moving"])  # deterministic per (seed, index)
    assert not torch.equal(augmented[1]["moving"], after["moving"])  # next epoch's index differs


def test_voxel_to_world_inverse():
    affine = np.array([[0, -2.0, 0, 5], [1.5, 0, 0, -3], [0, 0, 3, 1], [0, 0, 0, 1]])
    voxels = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
    world = voxel_to_world(affine, voxels)
    np.testing.assert_allclose(world[0], [5 - 4.0, -3 + 1.5, 1 + 9.0])
    np.testing.assert_allclose(voxel_to_world(np.linalg.inv(affine), world), voxels)


@pytest.mark.parametrize("affine", AFFINES, ids=["RAS", "LAS", "LPS"])
def test_foreground_centre_centres_the_head_and_keeps_world_positions(tmp_path, affine):
    """``centre="foreground"`` puts an off-centre object in the middle of the network grid, and
    the grid's affine still maps every voxel to the world point it came from."""
    from regnet.data.preprocess import load_pair

    shape = (20, 16, 12)
    image = np.random.default_rng(0).uniform(0.0, 2.0, shape).astype(np.float32)  # noise
    image[1:7, 2:8, 1:5] = 100.0  # bright off-centre object
    label = np.zeros(shape, np.int16)
    label[1:7, 2:8, 1:5] = 1
    affine = affine @ np.diag([2.0, 1.5, 1.0, 1.0])
    affine[:3, 3] = (10.0, -4.0, 3.0)
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "i.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "l.nii.gz"))
    world = voxel_to_world(affine, np.argwhere(label > 0)).mean(0)
    centred = {}
    for centre in ("grid", "foreground"):
        item = load_pair(
            tmp_path / "i.nii.gz",
            tmp_path / "i.nii.gz",
            tmp_path / "l.nii.gz",
            tmp_path / "l.nii.gz",
            spacing=1.0,
            shape=(16, 16, 16),
            centre=centre,
        )
        voxels = np.argwhere(item["fixed_label"][0].numpy() > 0)
        centred[centre] = np.abs(voxels.mean(0) - 7.5).max()
    # the whole object (12 x 9 x 4 mm) is inside the foreground-centred grid, where it was
    assert abs(len(voxels) - 12 * 9 * 4) <= 12 * 4
    mapped = voxel_to_world(item["fixed_affine"].numpy(), voxels).mean(0)
    np.testing.assert_allclose(mapped, world, atol=0.75)
    assert centred["foreground"] <= 1.0 < 3.0 < centred["grid"]
