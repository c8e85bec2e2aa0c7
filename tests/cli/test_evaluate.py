"""``evaluate.py``: methods side by side over a pair list and a Learn2Reg split.

Identity rows are checked against NumPy (landmark distances, Dice of identical maps), network rows
against ``predict.py`` on the same pair, and the summary against the per-pair CSV.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tiny_models import train_tiny_checkpoint

from regnet.cli.evaluate import COLUMNS, main
from regnet.cli.predict import main as predict_main

SHAPE_A, SHAPE_B = (14, 12, 10), (13, 15, 9)
AFFINE_A = np.array([[-1.5, 0, 0, 22.0], [0, 1.2, 0, -8.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])
AFFINE_B = np.array([[-1.4, 0, 0, 21.3], [0, -1.3, 0, 10.7], [0, 0, 2.1, 2.2], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small 3D VoxelMorph trained for two steps on 16^3 synthetic data."""
    return train_tiny_checkpoint(tmp_path_factory.mktemp("train"), "debug3d")


def smooth_image(shape, phase: float) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.linspace(0, np.pi, n) for n in shape], indexing="ij")
    return (100 * np.sin(i + phase) * np.sin(j) * np.cos(0.5 * k) + 50).astype(np.float32)


def save(path: Path, data: np.ndarray, matrix: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, matrix), str(path))
    return path.name


POINTS_A = np.array([[10.0, -2.0, 8.0], [14.0, 1.0, 12.0], [8.0, 3.0, 10.0]])
POINTS_B = POINTS_A + [[0.5, -0.3, 0.2], [1.0, 0.0, -0.4], [0.0, 0.8, 0.3]]


@pytest.fixture
def pair_list(tmp_path: Path) -> Path:
    for name, shape, matrix, phase, points in (
        ("a", SHAPE_A, AFFINE_A, 0.0, POINTS_A),
        ("b", SHAPE_B, AFFINE_B, 0.3, POINTS_B),
    ):
        image = smooth_image(shape, phase)
        save(tmp_path / f"{name}.nii.gz", image, matrix)
        save(tmp_path / f"{name}_labels.nii.gz", (image // 40).astype(np.int16), matrix)
        rows = ["x,y,z"] + [",".join(map(str, p)) for p in points]
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
    header = "fixed,moving,fixed_label,moving_label,fixed_landmarks,moving_landmarks\n"
    same = "a.nii.gz,a.nii.gz,a_labels.nii.gz,a_labels.nii.gz,a.csv,a.csv\n"
    other = "a.nii.gz,b.nii.gz,a_labels.nii.gz,b_labels.nii.gz,a.csv,b.csv\n"
    path = tmp_path / "pairs.csv"
    path.write_text(header + same + other)
    return path


def run_main(entry, args: list[str], capsys) -> tuple[int, str]:
    try:
        entry(args)
        status = 0
    except SystemExit as stop:
        status = int(stop.code)
    return status, capsys.readouterr().err


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_methods_side_by_side_over_a_pair_list(checkpoint, pair_list, tmp_path, capsys):
    out = tmp_path / "eval"
    args = [
        f"methods=[ckpt:{checkpoint},identity,register:affine]",
        "register={levels:1,iterations:[5],affine_iterations:[5],spacing:3}",
        f"pairs={pair_list}",
        f"out={out}",
        "device=cpu",
    ]
    status, err = run_main(main, args, capsys)
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest",
        "per_pair.csv",
        "per_pair.json",
        "summary.csv",
        "summary.md",
    ]
    rows = read_rows(out / "per_pair.csv")
    assert [(r["method"], r["pair"]) for r in rows] == [
        (method, pair)
        for pair in ("001_a_to_a", "002_b_to_a")
        for method in (f"ckpt:{checkpoint}", "identity", "register:affine")
    ]
    same, other = rows[1], rows[4]  # identity rows
    assert float(same["dice_mean"]) == 1.0 and float(same["hd95_mean"]) == 0.0
    assert float(same["tre_mean_mm"]) == 0.0 and float(same["folding_percent"]) == 0.0
    distances = np.linalg.norm(POINTS_B - POINTS_A, axis=1).mean()
    assert float(other["tre_mean_mm"]) == pytest.approx(distances, rel=1e-9)
    assert all(float(r["seconds"]) >= 0 for r in rows)
    # the network row equals predict.py on the same pair
    predicted = tmp_path / "predicted"
    files = [pair_list.parent / n for n in ("a.nii.gz", "b.nii.gz", "a_labels.nii.gz")]
    labels = f"labels=[{files[2]},{pair_list.parent / 'b_labels.nii.gz'}]"
    predict_args = [f"ckpt={checkpoint}", f"pair=[{files[0]},{files[1]}]", labels]
    status, err = run_main(predict_main, [*predict_args, f"out={predicted}"], capsys)
    assert status == 0, err
    metrics = json.loads((predicted / "metrics.json").read_text())
    assert float(rows[3]["dice_mean"]) == pytest.approx(metrics["dice_mean"], rel=1e-9)
    assert float(rows[3]["sdlogj"]) == pytest.approx(metrics["sdlogj"], rel=1e-6)
    # the summary is the mean and population std of the per-pair rows
    summary = {r["method"]: r for r in read_rows(out / "summary.csv")}
    for method in ("identity", f"ckpt:{checkpoint}", "register:affine"):
        for column in COLUMNS:
            values = [float(r[column]) for r in rows if r["method"] == method and r[column]]
            mean = summary[method][f"{column}_mean"]
            assert float(mean) == pytest.approx(np.mean(values), rel=1e-9, abs=1e-12)
            assert float(summary[method][f"{column}_std"]) == pytest.approx(
                np.std(values), rel=1e-9, abs=1e-12
            )
            assert int(summary[method][f"{column}_n"]) == len(values)
    markdown = (out / "summary.md").read_text()
    assert markdown.splitlines()[0].startswith("| method | dice_mean")


def test_learn2reg_split_uses_voxel_keypoints(tmp_path, capsys):
    for name, shape, matrix, phase in (
        ("img0", SHAPE_A, AFFINE_A, 0.0),
        ("img1", SHAPE_A, AFFINE_A, 0.3),
    ):
        (tmp_path / "imagesTr").mkdir(exist_ok=True)
        save(tmp_path / "imagesTr" / f"{name}.nii.gz", smooth_image(shape, phase), matrix)
    keypoints = {"img0": np.array([[2, 3, 4], [5, 6, 1]]), "img1": np.array([[3, 3, 4], [5, 8, 2]])}
    (tmp_path / "keypointsTr").mkdir()
    for name, rows in keypoints.items():
        lines = [",".join(map(str, row)) for row in rows]
        (tmp_path / "keypointsTr" / f"{name}.csv").write_text("\n".join(lines) + "\n")
    info = {
        "training": [
            {"image": f"./imagesTr/{n}.nii.gz", "keypoints": f"./keypointsTr/{n}.csv"}
            for n in keypoints
        ],
        "registration_val": [
            {"fixed": "./imagesTr/img0.nii.gz", "moving": "./imagesTr/img1.nii.gz"}
        ],
    }
    (tmp_path / "task.json").write_text(json.dumps(info))
    out = tmp_path / "eval"
    args = [f"learn2reg={tmp_path / 'task.json'}", "methods=[identity]", f"out={out}"]
    status, err = run_main(main, args, capsys)
    assert status == 0, err
    (row,) = read_rows(out / "per_pair.csv")
    assert row["pair"] == "001_img1_to_img0"
    stored = nib.load(str(tmp_path / "imagesTr" / "img0.nii.gz")).affine  # float32 in the file
    world = {n: (stored[:3, :3] @ k.T).T + stored[:3, 3] for n, k in keypoints.items()}
    expected = np.linalg.norm(world["img1"] - world["img0"], axis=1).mean()
    assert float(row["tre_mean_mm"]) == pytest.approx(expected, rel=1e-9)
    assert row["dice_mean"] == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["methods=[magic]"], "error: methods: magic: expected identity, ckpt:PATH or register"),
        (["methods=[ckpt:missing.ckpt]"], "error: missing.ckpt: checkpoint not found"),
        ([], "error: pairs/learn2reg: give exactly one"),
    ],
)
def test_bad_arguments_give_one_line(args, message, pair_list, tmp_path, capsys):
    out = tmp_path / "eval"
    if args:
        args = [*args, f"pairs={pair_list}"]
    status, err = run_main(main, [*args, f"out={out}"], capsys)
    assert status == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists()


def test_existing_results_are_left_untouched(pair_list, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.md").write_text("old")
    status, err = run_main(main, [f"pairs={pair_list}", f"out={out}"], capsys)
    assert status == 2 and "already holds results" in err
    assert (out / "summary.md").read_text() == "old" and len(list(out.iterdir())) == 1
