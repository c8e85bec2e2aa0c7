"""``submission=DIR``: Learn2Reg submission folders from ``evaluate.py``, scored as the challenge
scores them."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from test_evaluate import checkpoint  # noqa: F401  (a tiny trained network)

from regnet.cli.evaluate import main
from regnet.cli.predict import main as predict_main

SHAPE = (16, 14, 12)
FIXED_AFFINE = np.diag([1.5, 1.2, 2.0, 1.0])
OFFSET = np.array([2.0, -1.0, 0.0])  # moving grid origin, in fixed voxels


def write_task(root):
    """Case 1: ``_0000`` (fixed) and ``_0001`` on a grid shifted by ``OFFSET`` voxels; case 2:
    ``_0000``. Label boxes, three keypoints each."""
    moving_affine = FIXED_AFFINE.copy()
    moving_affine[:3, 3] = FIXED_AFFINE[:3, :3] @ OFFSET
    rng = np.random.default_rng(3)
    entries = []
    for name, affine, corner in (
        ("Task_0001_0000", FIXED_AFFINE, (4, 4, 3)),
        ("Task_0001_0001", moving_affine, (3, 6, 4)),
        ("Task_0002_0000", FIXED_AFFINE, (5, 3, 3)),
    ):
        labels = np.zeros(SHAPE, np.int16)
        i, j, k = corner
        labels[i : i + 6, j : j + 5, k : k + 4] = 1
        labels[i + 6 : i + 9, j : j + 5, k : k + 4] = 2
        for folder, data in (("imagesTr", labels * 50.0 + rng.random(SHAPE)), ("labelsTr", labels)):
            (root / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(root / folder / f"{name}.nii.gz"))
        (root / "keypointsTr").mkdir(exist_ok=True)
        points = np.array(corner) + [[1, 1, 1], [3, 2, 1], [5, 4, 2]]
        np.savetxt(root / "keypointsTr" / f"{name}.csv", points, delimiter=",", fmt="%d")
        entries.append({"image": f"./imagesTr/{name}.nii.gz"})
    info = {
        "name": "Task",
        "tensorImageShape": {"0": list(SHAPE)},
        "labels": {"0": "background", "1": "a", "2": "b", "3": "c"},
        "training": entries,
        "registration_val": [
            {"fixed": "./imagesTr/Task_0001_0000.nii.gz", "moving": f"./imagesTr/{m}.nii.gz"}
            for m in ("Task_0001_0001", "Task_0002_0000")
        ],
    }
    (root / "Task_dataset.json").write_text(json.dumps(info))
    return root / "Task_dataset.json"


def test_identity_submission_is_scored_as_the_challenge_does(tmp_path, capsys):
    dataset = write_task(tmp_path)
    submission, out = tmp_path / "submission", tmp_path / "eval"
    main([f"learn2reg={dataset}", "methods=[identity]", f"submission={submission}", f"out={out}"])
    assert sorted(p.name for p in submission.iterdir()) == [
        "disp_0001_0000_0002_0000.nii.gz",  # same modality: the long name
        "disp_0001_0001.nii.gz",  # 0000 <- 0001: the short name
    ]
    # world identity: fixed voxel x lies at moving voxel x - OFFSET
    short = nib.load(str(submission / "disp_0001_0001.nii.gz"))
    assert short.shape == (*SHAPE, 3)
    np.testing.assert_allclose(short.affine, FIXED_AFFINE)
    np.testing.assert_allclose(short.get_fdata(), np.broadcast_to(-OFFSET, (*SHAPE, 3)), atol=1e-6)
    np.testing.assert_allclose(
        nib.load(str(submission / "disp_0001_0000_0002_0000.nii.gz")).get_fdata(), 0.0
    )

    results = json.loads((out / "learn2reg.json").read_text())
    spacing = np.diag(FIXED_AFFINE)[:3]
    fixed_points = np.loadtxt(tmp_path / "keypointsTr" / "Task_0001_0000.csv", delimiter=",")
    for case, moving, shift in (
        ("0001_0000<--0001_0001", "Task_0001_0001", -OFFSET),
        ("0001_0000<--0002_0000", "Task_0002_0000", np.zeros(3)),
    ):
        moving_points = np.loadtxt(tmp_path / "keypointsTr" / f"{moving}.csv", delimiter=",")
        expected = np.linalg.norm((fixed_points + shift - moving_points) * spacing, axis=1)
        np.testing.assert_allclose(
            results["cases"][case]["TRE_kp"]["detailed"], expected, atol=1e-5
        )
        fixed = nib.load(str(tmp_path / "labelsTr" / "Task_0001_0000.nii.gz")).get_fdata()
        moving_labels = nib.load(str(tmp_path / "labelsTr" / f"{moving}.nii.gz")).get_fdata()
        warped = np.roll(moving_labels, tuple(int(s) for s in -shift), axis=(0, 1, 2))
        dice = [
            2 * ((fixed == v) & (warped == v)).sum() / ((fixed == v).sum() + (warped == v).sum())
            for v in (1, 2)
        ]
        detailed = results["cases"][case]["DSC"]["detailed"]
        assert detailed[:2] == pytest.approx(dice) and detailed[2] is None  # label 3 absent
    assert results["cases"]["0001_0000<--0001_0001"]["LogJacDetStd"]["mean"] == 0.0
    assert "| DSC |" in (out / "summary.md").read_text()


def test_submission_needs_one_method_and_learn2reg_names(tmp_path, capsys):
    dataset = write_task(tmp_path)
    submission = tmp_path / "submission"
    with pytest.raises(SystemExit):
        main(
            [
                f"learn2reg={dataset}",
                "methods=[identity,register:affine]",
                f"submission={submission}",
                f"out={tmp_path / 'eval'}",
            ]
        )
    assert capsys.readouterr().err.startswith("error: submission: holds the fields of one method")
    with pytest.raises(SystemExit):
        main([f"learn2reg={dataset}", f"submission={submission}", f"out={submission}"])
    assert "must be another folder than out" in capsys.readouterr().err
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "fixed,moving\nimagesTr/Task_0001_0000.nii.gz,keypointsTr/../imagesTr/x.nii.gz\n"
    )
    (tmp_path / "imagesTr" / "x.nii.gz").write_bytes(
        (tmp_path / "imagesTr" / "Task_0002_0000.nii.gz").read_bytes()
    )
    with pytest.raises(SystemExit):
        main([f"pairs={pairs}", f"submission={submission}", f"out={tmp_path / 'eval'}"])
    assert "x.nii.gz: not a Learn2Reg image name" in capsys.readouterr().err
    assert not submission.exists() and not (tmp_path / "eval").exists()


def test_predict_writes_the_networks_fields_as_a_submission(checkpoint, tmp_path):  # noqa: F811
    dataset = write_task(tmp_path)
    submission, out = tmp_path / "submission", tmp_path / "out"
    # the network's own field (not the start check's choice), so the conversion is what is tested
    args = [f"ckpt={checkpoint}", "device=cpu", "overview=false", "start_check=false"]
    predict_main([*args, f"learn2reg={dataset}", f"submission={submission}", f"out={out}"])
    assert not out.exists()  # only the submission is written
    field = nib.load(str(submission / "disp_0001_0001.nii.gz")).get_fdata()
    # the same pair through predict.py's usual outputs, converted independently
    images = [tmp_path / "imagesTr" / f"Task_0001_{m}.nii.gz" for m in ("0000", "0001")]
    predict_main([*args, f"pair=[{images[0]},{images[1]}]", f"out={out}"])
    disp_mm = np.moveaxis(nib.load(str(out / "disp_mm.nii.gz")).get_fdata()[:, :, :, 0], -1, 0)
    moving_affine = nib.load(str(images[1])).affine
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), -1)
    world = grid @ FIXED_AFFINE[:3, :3].T + FIXED_AFFINE[:3, 3] + np.moveaxis(disp_mm, 0, -1)
    moving_voxels = (world - moving_affine[:3, 3]) @ np.linalg.inv(moving_affine[:3, :3]).T
    np.testing.assert_allclose(field, moving_voxels - grid, atol=1e-4)
    assert np.abs(field + OFFSET).max() > 1e-3  # the network moved something
