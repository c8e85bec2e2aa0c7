"""Small Learn2Reg-layout tasks for checking submissions against the challenge's evaluation.

``synth``: a labelled task in the challenge's layout (``imagesTr``, ``labelsTr``,
``keypointsTr``, ``SynthCT_dataset.json``): three subjects of 48 x 40 x 32 voxels at
1.5 x 1.2 x 2 mm, each with a ``_0000`` and a deformed ``_0001`` scan (4 labels, 30 keypoints of
voxel indices); validation pairs ``0001_0000 <- 0001_0001``, ``0002_0000 <- 0002_0001`` (short
file names) and ``0001_0000 <- 0003_0000`` (long name).

``lungct``: the LungCT sample ground truth the challenge's evaluation ships
(``evaluation/L2RTest/ground-truth``: keypoints, landmarks, fixed masks, config) has no images;
this writes them on the masks' grids: the fixed scan a smoothed lung mask, the moving scan that
image moved by the affine map fitted to the keypoint pairs, plus ``LungCT_dataset.json``.

Usage: ``python scripts/learn2reg_cases.py synth OUT`` or
``python scripts/learn2reg_cases.py lungct GROUND_TRUTH_FOLDER``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

SHAPE = (48, 40, 32)
AFFINE = np.diag([1.5, 1.2, 2.0, 1.0])


def _displacement(shape, amplitude: float, phase: float) -> np.ndarray:
    """A smooth backward voxel displacement ``(3, *shape)``."""
    grid = np.meshgrid(*(np.linspace(0, np.pi, n) for n in shape), indexing="ij")
    return (
        np.stack(
            [amplitude * np.sin(grid[(c + 1) % 3] + phase) * np.cos(grid[c]) for c in range(3)]
        )
        + np.array([1.5, -1.0, 0.5])[:, None, None, None]
    )


def _subject(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An image and 4-label map of ellipsoids."""
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"))
    labels = np.zeros(SHAPE, np.int16)
    for label in range(1, 5):
        centre = np.array(SHAPE) * rng.uniform(0.3, 0.7, 3)
        radii = np.array(SHAPE) * rng.uniform(0.12, 0.22, 3)
        inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0)
        labels[inside <= 1] = label
    image = ndimage.gaussian_filter(labels.astype(np.float32) * 40 + 20, 1.0)
    return image.astype(np.float32), labels


def _warp(volume: np.ndarray, disp: np.ndarray, order: int) -> np.ndarray:
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij"))
    return ndimage.map_coordinates(volume, grid - disp, order=order, mode="nearest")


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _save_points(path: Path, points: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, points, delimiter=",", fmt="%.6f")


def synth(out: Path) -> None:
    rng = np.random.default_rng(7)
    training = []
    for case in (1, 2, 3):
        image, labels = _subject(rng)
        disp = _displacement(SHAPE, 2.0, 0.5 * case)
        points = np.argwhere(labels > 0)[rng.choice((labels > 0).sum(), 30, replace=False)]
        points = points.astype(np.float64)
        sampled = np.stack([ndimage.map_coordinates(d, points.T, order=1) for d in disp], 1)
        scans = {
            "0000": (image, labels, points),
            "0001": (_warp(image, disp, 1), _warp(labels, disp, 0), points + sampled),
        }
        for modality, (data, label_map, keypoints) in scans.items():
            name = f"SynthCT_{case:04d}_{modality}"
            _save(out / "imagesTr" / f"{name}.nii.gz", data, AFFINE)
            _save(out / "labelsTr" / f"{name}.nii.gz", label_map.astype(np.int16), AFFINE)
            _save_points(out / "keypointsTr" / f"{name}.csv", keypoints)
            training.append(
                {
                    "image": f"./imagesTr/{name}.nii.gz",
                    "label": f"./labelsTr/{name}.nii.gz",
                    "keypoints": f"./keypointsTr/{name}.csv",
                }
            )
    pairs = [("0001_0000", "0001_0001"), ("0002_0000", "0002_0001"), ("0001_0000", "0003_0000")]
    info = {
        "name": "SynthCT",
        "tensorImageShape": {"0": list(SHAPE)},
        "labels": {"0": {str(i): f"label {i}" for i in range(5)}},
        "training": training,
        "registration_val": [
            {"fixed": f"./imagesTr/SynthCT_{f}.nii.gz", "moving": f"./imagesTr/SynthCT_{m}.nii.gz"}
            for f, m in pairs
        ],
    }
    (out / "SynthCT_dataset.json").write_text(json.dumps(info, indent=2))


def lungct(root: Path) -> None:
    config = json.loads((root / "LungCT_VAL_evaluation_config.json").read_text())
    training = []
    for pair in config["eval_pairs"]:
        fixed, moving = pair["fixed"], pair["moving"]
        mask = nib.load(str(root / fixed.replace("images", "masks")))
        image = ndimage.gaussian_filter(np.asarray(mask.dataobj, np.float32) * 800 - 900, 2.0)
        points = [
            np.loadtxt(
                root / p.replace("images", "keypoints").replace(".nii.gz", ".csv"), delimiter=","
            )
            for p in (fixed, moving)
        ]
        ones = np.ones((len(points[0]), 1))
        # moving voxel = A (fixed voxel, 1): least squares over the keypoint pairs
        fit = np.linalg.lstsq(np.hstack([points[0], ones]), points[1], rcond=None)[0].T
        inverse = np.linalg.inv(np.vstack([fit, [0, 0, 0, 1]]))
        moved = ndimage.affine_transform(image, inverse[:3, :3], inverse[:3, 3], order=1, cval=-900)
        _save(root / fixed, image.astype(np.float32), mask.affine)
        _save(root / moving, moved.astype(np.float32), mask.affine)
        for path in (fixed, moving):
            entry = {
                "image": path,
                "keypoints": path.replace("images", "keypoints").replace(".nii.gz", ".csv"),
            }
            training.append(entry)
    info = {
        "name": "LungCT",
        "tensorImageShape": {"0": config["expected_shape"][:3]},
        "training": training,
        "registration_val": config["eval_pairs"],
    }
    (root / "LungCT_dataset.json").write_text(json.dumps(info, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=("synth", "lungct"))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    (synth if args.case == "synth" else lungct)(args.folder)


if __name__ == "__main__":
    main()
