"""Learn2Reg submissions, and the challenge's own evaluation of a submission folder.

Conventions are those of the official evaluation (``evaluation/evaluation.py`` and ``utils.py``
of the MDL-UzL/L2R repository, version 2.0):

* **Names.** Task images are named ``<task>_<case>_<modality>.nii.gz`` with 4-digit case and
  modality numbers. The field of a pair is ``disp_<fixed case>_<moving case>.nii.gz`` when the
  fixed modality is ``0000`` and the moving one ``0001`` (the only case where the evaluation
  accepts the short name), else ``disp_<fixed case>_<fixed modality>_<moving case>_<moving
  modality>.nii.gz`` (always accepted). Older evaluation containers took the short name for every
  same-modality pair (e.g. OASIS ``0000``/``0000``) instead.
* **Content.** ``(I, J, K, 3)`` on the fixed image's voxel grid (array axes of the fixed file), in
  **voxels**, component ``c`` along array axis ``c``, **backward**: fixed voxel ``x`` corresponds to
  moving voxel ``x + disp(x)``. The evaluation samples the moving label map at ``x + disp(x)``
  (``scipy.ndimage.map_coordinates``, nearest) and maps fixed keypoints to ``x + disp(x)``
  (``disp`` sampled there by cubic spline interpolation, ``map_coordinates``' default).
* **Metrics** (:func:`evaluate_submission`), per pair: ``dice`` per label (``nan`` where the label
  is absent from the fixed or the *original* moving map, averaged with ``nanmean``); ``hd95`` the
  95th percentile of surface-element-area weighted surface distances in **voxels** (unit spacing;
  DeepMind's ``surface-distance``, computed here with MONAI's sub-voxel surface elements);
  ``tre`` ``|x_f + disp(x_f) - x_m|`` times the moving image's voxel size (mm); ``sdlogj`` the
  std of ``log(clip(det J + 3, 1e-9, 1e9))`` over the field cropped by 2 voxels (central
  differences), masked by the fixed mask when the configuration says so. Over pairs: mean, std
  and the 30 % quantile of the worse side (0.7 quantile for ``sdlogj`` and ``tre``, 0.3 for
  ``dice`` and ``hd95``, as the evaluation has it).

An evaluation configuration (the challenge's ``<task>_VAL_evaluation_config.json``) names the
pairs, metrics, labels and keypoint folders; :meth:`EvaluationConfig.from_dataset` builds one from a
task's ``dataset.json`` as the challenge's ``create_evaluation_config.py`` would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from regnet.data.io import DataError

_IMAGE_NAME = re.compile(r"^.+_(\d{4})_(\d{4})\.nii\.gz$")
AGGREGATE_QUANTILE = {"dice": 0.3, "hd95": 0.3, "sdlogj": 0.7, "tre": 0.7}
"""Per metric kind, the quantile over pairs the evaluation reports as its ``30`` aggregate."""


def case_and_modality(image: str | Path) -> tuple[str, str]:
    """``(case, modality)`` 4-digit strings of a Learn2Reg image name.

    Raises:
        DataError: when the name is not ``<task>_<case>_<modality>.nii.gz``.
    """
    match = _IMAGE_NAME.match(Path(image).name)
    if match is None:
        raise DataError(
            f"{image}: not a Learn2Reg image name <task>_<4-digit case>_<4-digit modality>.nii.gz"
        )
    return match.group(1), match.group(2)


def submission_name(fixed: str | Path, moving: str | Path) -> str:
    """File name of a pair's displacement field in a submission (see the module docstring)."""
    fixed_case, fixed_modality = case_and_modality(fixed)
    moving_case, moving_modality = case_and_modality(moving)
    if (fixed_modality, moving_modality) == ("0000", "0001"):
        return f"disp_{fixed_case}_{moving_case}.nii.gz"
    return f"disp_{fixed_case}_{fixed_modality}_{moving_case}_{moving_modality}.nii.gz"


def voxel_displacement(
    disp_mm: torch.Tensor | np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray
) -> np.ndarray:
    """A world field on the fixed grid as a Learn2Reg voxel displacement.

    Fixed voxel ``x`` lies at world ``A_f x``, which the transform maps to ``A_f x + disp_mm``,
    the moving voxel ``A_m^-1 (A_f x + disp_mm)``; the result is that minus ``x``.

    Args:
        disp_mm: ``(1, 3, I, J, K)`` or ``(3, I, J, K)`` backward displacement in mm, RAS
            components, on the fixed grid (:class:`regnet.pipeline.GridField`).
        fixed_affine, moving_affine: ``(4, 4)`` voxel -> RAS affines of the two image files.

    Returns:
        ``(I, J, K, 3)`` float64 moving-grid voxels.
    """
    disp = disp_mm.detach().cpu().numpy() if isinstance(disp_mm, torch.Tensor) else disp_mm
    disp = np.asarray(disp, np.float64).reshape(3, *np.shape(disp)[-3:])
    world_to_moving = np.linalg.inv(np.asarray(moving_affine, np.float64))
    fixed_to_moving = world_to_moving @ np.asarray(fixed_affine, np.float64)
    axes = (np.arange(n, dtype=np.float64) for n in disp.shape[1:])
    voxels = np.stack(np.meshgrid(*axes, indexing="ij"))
    moved = np.einsum("ij,j...->i...", fixed_to_moving[:3, :3], voxels)
    moved += fixed_to_moving[:3, 3, None, None, None]
    moved += np.einsum("ij,j...->i...", world_to_moving[:3, :3], disp)
    return np.moveaxis(moved - voxels, 0, -1)


def write_displacement(path: str | Path, disp_vox: np.ndarray, fixed_affine: np.ndarray) -> Path:
    """Save a voxel displacement ``(I, J, K, 3)`` as a float32 NIfTI file with the fixed image's
    affine (the evaluation reads only the array)."""
    data = np.asarray(disp_vox, np.float32)
    if data.ndim != 4 or data.shape[3] != 3:
        raise ValueError(f"{path}: displacement must have shape (I, J, K, 3), got {data.shape}")
    image = nib.Nifti1Image(data, np.asarray(fixed_affine, np.float64))
    image.set_sform(image.affine, code=1)
    image.set_qform(image.affine, code=1)
    nib.save(image, str(path))
    return Path(path)


def read_displacement(path: str | Path) -> np.ndarray:
    """A submission field as the evaluation reads it: ``.nii.gz`` as float64, ``.npz`` (one
    array) as float32."""
    path = Path(path)
    if path.name.endswith(".nii.gz"):
        return nib.load(str(path)).get_fdata()
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            if len(arrays.files) != 1:
                raise DataError(f"{path}: a .npz field must hold exactly one array")
            return arrays[arrays.files[0]].astype(np.float32)
    raise DataError(f"{path}: a displacement field is a .nii.gz or .npz file")


def find_displacement(folder: str | Path, fixed: str, moving: str) -> Path:
    """The field of a pair in a submission folder (``.npz`` before ``.nii.gz``, the short name
    before the long one where the short one is allowed)."""
    fixed_case, fixed_modality = case_and_modality(fixed)
    moving_case, moving_modality = case_and_modality(moving)
    stems = [f"disp_{fixed_case}_{fixed_modality}_{moving_case}_{moving_modality}"]
    if (fixed_modality, moving_modality) == ("0000", "0001"):
        stems.insert(0, f"disp_{fixed_case}_{moving_case}")
    for stem in stems:
        for suffix in (".npz", ".nii.gz"):
            if (Path(folder) / (stem + suffix)).is_file():
                return Path(folder) / (stem + suffix)
    raise DataError(f"{Path(folder) / stems[-1]}.nii.gz: displacement field missing")


# ---------------------------------------------------------------------------------------------
# The evaluation's metrics, on arrays.


def warp_labels(moving_labels: np.ndarray, disp_vox: np.ndarray) -> np.ndarray:
    """The moving label map sampled at ``x + disp(x)`` (nearest, 0 outside), on the fixed grid."""
    from scipy import ndimage  # imported where used: 0.2 s that register.py does not need

    identity = np.stack(np.meshgrid(*(np.arange(n) for n in disp_vox.shape[:3]), indexing="ij"))
    coordinates = identity + np.moveaxis(disp_vox, -1, 0)
    return ndimage.map_coordinates(moving_labels, coordinates, order=0)


def dice_scores(
    fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, labels: Sequence[int]
) -> list[float]:
    """Dice of ``fixed == label`` and ``warped == label`` per label, ``nan`` where the label is
    absent from ``fixed`` or ``moving``."""
    scores = []
    for label in labels:
        if not (fixed == label).any() or not (moving == label).any():
            scores.append(float("nan"))
            continue
        a, b = fixed == label, warped == label
        scores.append(float(2.0 * (a & b).sum() / (a.sum() + b.sum())))
    return scores


def _robust_distance(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """The distance below which ``percent`` % of the surface area lies (``inf`` without
    surface)."""
    if distances.size == 0:
        return float("inf")
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(areas[order]) / areas.sum()
    index = min(int(np.searchsorted(cumulative, percent / 100.0)), distances.size - 1)
    return float(distances[order][index])


def surface_hd95(fixed_mask: np.ndarray, warped_mask: np.ndarray) -> float:
    """DeepMind's robust Hausdorff distance at 95 % with unit spacing (voxels): surface elements
    on the voxel-corner lattice weighted by their area (MONAI's sub-voxel edges), distances to the
    other surface's elements; ``inf`` when either mask is empty."""
    from monai.metrics.utils import get_mask_edges  # MONAI takes seconds to import
    from scipy import ndimage

    if not fixed_mask.any() or not warped_mask.any():
        return float("inf")
    edges_fixed, edges_warped, areas_fixed, areas_warped = (
        t.numpy()
        for t in get_mask_edges(
            torch.from_numpy(fixed_mask), torch.from_numpy(warped_mask), spacing=(1.0, 1.0, 1.0)
        )
    )
    to_warped = ndimage.distance_transform_edt(~edges_warped)
    to_fixed = ndimage.distance_transform_edt(~edges_fixed)
    return max(
        _robust_distance(to_warped[edges_fixed], areas_fixed[edges_fixed], 95.0),
        _robust_distance(to_fixed[edges_warped], areas_warped[edges_warped], 95.0),
    )


def hd95_scores(
    fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, labels: Sequence[int]
) -> list[float]:
    """:func:`surface_hd95` per label (voxels), ``nan`` where the label is absent from ``fixed``
    or ``moving``."""
    scores = []
    for label in labels:
        if not (fixed == label).any() or not (moving == label).any():
            scores.append(float("nan"))
        else:
            scores.append(surface_hd95(fixed == label, warped == label))
    return scores


def keypoint_tre(
    fixed_points: np.ndarray,
    moving_points: np.ndarray,
    disp_vox: np.ndarray,
    moving_spacing: Sequence[float],
) -> np.ndarray:
    """``|(x_f + disp(x_f) - x_m) * spacing|`` per keypoint pair, mm; points ``(N, 3)`` voxel
    indices, ``disp`` sampled by cubic spline interpolation (zero outside)."""
    from scipy import ndimage

    fixed_points = np.asarray(fixed_points, np.float64).reshape(-1, 3)
    sampled = np.stack(
        [ndimage.map_coordinates(disp_vox[..., c], fixed_points.T) for c in range(3)], axis=1
    )
    error = (fixed_points + sampled - np.asarray(moving_points, np.float64).reshape(-1, 3)) * (
        np.asarray(moving_spacing, np.float64)
    )
    return np.linalg.norm(error, axis=1)


def log_jacobian(disp_vox: np.ndarray) -> np.ndarray:
    """``log(clip(det J + 3, 1e-9, 1e9))`` of ``x + disp(x)`` by central differences, cropped by
    2 voxels on every side: ``(I - 4, J - 4, K - 4)``."""
    gradients = np.stack(
        [np.stack(np.gradient(disp_vox[..., c]), axis=0) for c in range(3)], axis=0
    )  # (component, axis, I, J, K)
    jacobian = gradients[:, :, 2:-2, 2:-2, 2:-2] + np.eye(3)[:, :, None, None, None]
    det = np.linalg.det(np.moveaxis(jacobian, (0, 1), (-2, -1)))
    return np.log(np.clip(det + 3.0, 1e-9, 1e9))


def sdlogj(disp_vox: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Standard deviation of :func:`log_jacobian`, over the cropped ``mask > 0`` where given."""
    values = log_jacobian(disp_vox)
    if mask is None:
        return float(values.std())
    return float(np.ma.MaskedArray(values, 1 - mask[2:-2, 2:-2, 2:-2]).std())


# ---------------------------------------------------------------------------------------------
# Evaluation of a submission folder.


@dataclass(frozen=True)
class EvaluationConfig:
    """What the evaluation scores: ``methods`` (``{"name", "metric": sdlogj|dice|hd95|tre,
    "labels"?: [...], "dest"?: keypoint folder prefix}``), ``pairs`` (image paths relative to the
    task folder, as in ``dataset.json``), ``masked`` (SDlogJ within the fixed masks) and the
    ``expected_shape`` ``(I, J, K, 3)`` of every field (``None``: not checked)."""

    task_name: str
    methods: tuple[dict, ...]
    pairs: tuple[tuple[str, str], ...]
    masked: bool = False
    expected_shape: tuple[int, ...] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> EvaluationConfig:
        """Read a challenge ``evaluation_config.json``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            pairs = tuple((p["fixed"], p["moving"]) for p in data["eval_pairs"])
            methods = tuple(dict(m) for m in data["evaluation_methods"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DataError(f"{path}: not a Learn2Reg evaluation config ({error})") from None
        unknown = [m.get("metric") for m in methods if m.get("metric") not in AGGREGATE_QUANTILE]
        if unknown:
            raise DataError(f"{path}: unknown metric {unknown[0]!r}")
        shape = data.get("expected_shape")
        return cls(
            str(data.get("task_name", path.stem)),
            methods,
            pairs,
            bool(data.get("masked_evaluation", False)),
            None if shape is None else tuple(int(n) for n in shape),
        )

    @classmethod
    def from_dataset(cls, dataset_json: str | Path, split: str) -> EvaluationConfig:
        """The configuration ``create_evaluation_config.py --SDlogJ --DSC DSC N --HD95 HD95 N
        --TRE TRE_kp keypoints`` gives for a ``dataset.json`` split (``val`` or ``test``): SDlogJ;
        Dice and HD95 over labels ``1..N`` (the largest label of the ``labels`` entry, else of the
        pairs' label maps) when every pair has label maps; keypoint TRE when every pair has
        keypoints; no masks."""
        dataset_json = Path(dataset_json)
        info = json.loads(dataset_json.read_text())
        key = f"registration_{split}"
        pairs = tuple((p["fixed"], p["moving"]) for p in info.get(key) or [])
        if not pairs:
            raise DataError(f"{dataset_json}: no '{key}' pairs")
        root = dataset_json.parent
        methods: list[dict] = [{"name": "LogJacDetStd", "metric": "sdlogj"}]
        images = [image for pair in pairs for image in pair]
        if all((root / ground_truth(i, "labels")).is_file() for i in images):
            largest = _largest_label(info.get("labels"))
            if largest is None:
                largest = max(
                    int(nib.load(root / ground_truth(i, "labels")).dataobj[...].max())
                    for i in images
                )
            labels = list(range(1, largest + 1))
            methods += [
                {"name": "DSC", "metric": "dice", "labels": labels},
                {"name": "HD95", "metric": "hd95", "labels": labels},
            ]
        if all(
            (root / keypoint_file(f, m, "keypoints", end)).is_file()
            for f, m in pairs
            for end in (f, m)
        ):
            methods.append({"name": "TRE_kp", "metric": "tre", "dest": "keypoints"})
        shape = (info.get("tensorImageShape") or {}).get("0")
        expected = None if shape is None else (*(int(n) for n in shape), 3)
        return cls(str(info.get("name", dataset_json.stem)), tuple(methods), pairs, False, expected)


def _largest_label(labels: Any) -> int | None:
    """The largest label id of a ``dataset.json`` ``labels`` entry (flat or per modality)."""
    if not isinstance(labels, dict):
        return None
    ids = [int(k) for k, v in labels.items() if str(k).isdigit() and not isinstance(v, dict)]
    for value in labels.values():
        if isinstance(value, dict):
            ids += [int(k) for k in value if str(k).isdigit()]
    return max(ids) if ids else None


def ground_truth(image: str, folder: str) -> str:
    """The evaluation's path of an image's label map (``folder="labels"``) or mask
    (``"masks"``): ``images`` replaced by ``folder`` in the relative path."""
    return image.replace("images", folder)


def keypoint_file(fixed: str, moving: str, dest: str, image: str) -> str:
    """The evaluation's keypoint CSV of ``image`` (the pair's fixed or moving image):
    ``images`` replaced by ``dest`` (plus ``<low modality><high modality>`` for pairs of
    different modalities other than ``0000`` -> ``0001``), ``.nii.gz`` by ``.csv``."""
    fixed_modality, moving_modality = case_and_modality(fixed)[1], case_and_modality(moving)[1]
    if not (
        fixed_modality == moving_modality or (fixed_modality, moving_modality) == ("0000", "0001")
    ):
        low, high = sorted((fixed_modality, moving_modality))
        dest = f"{dest}{low}{high}"
    return image.replace("images", dest).replace(".nii.gz", ".csv")


def case_key(fixed: str, moving: str) -> str:
    """The evaluation's name of a pair's results: ``<fixed case>_<mod><--<moving case>_<mod>``."""
    return "{}_{}<--{}_{}".format(*case_and_modality(fixed), *case_and_modality(moving))


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return nib.load(str(path)).get_fdata()


def evaluate_pair(
    disp_vox: np.ndarray, root: str | Path, fixed: str, moving: str, config: EvaluationConfig
) -> dict[str, dict[str, Any]]:
    """Every metric of ``config`` for one pair: ``{name: {"mean": float, "detailed": value or
    per-label / per-keypoint list}}`` (see the module docstring)."""
    root = Path(root)
    kinds = {m["metric"] for m in config.methods}
    warped = fixed_labels = moving_labels = None
    if kinds & {"dice", "hd95"}:
        fixed_labels = _load(root / ground_truth(fixed, "labels"))
        moving_labels = _load(root / ground_truth(moving, "labels"))
        warped = warp_labels(moving_labels, disp_vox)
    mask = None
    if config.masked and (root / ground_truth(fixed, "masks")).is_file():
        mask = _load(root / ground_truth(fixed, "masks"))
    results: dict[str, dict[str, Any]] = {}
    for method in config.methods:
        name, kind = method["name"], method["metric"]
        if kind == "sdlogj":
            value = sdlogj(disp_vox, mask)
            results[name] = {"mean": value, "detailed": value}
        elif kind in ("dice", "hd95"):
            score = dice_scores if kind == "dice" else hd95_scores
            detailed = score(fixed_labels, moving_labels, warped, method["labels"])
            finite = [v for v in detailed if not np.isnan(v)]
            results[name] = {"mean": float(np.mean(finite)) if finite else float("nan")}
            results[name]["detailed"] = detailed
        else:
            paths = [
                root / keypoint_file(fixed, moving, method["dest"], i) for i in (fixed, moving)
            ]
            for path in paths:
                if not path.is_file():
                    raise DataError(f"{path}: keypoint file not found")
            points = [np.loadtxt(path, delimiter=",").reshape(-1, 3) for path in paths]
            spacing = nib.load(str(root / moving)).header.get_zooms()[:3]
            errors = keypoint_tre(points[0], points[1], disp_vox, spacing)
            results[name] = {"mean": float(errors.mean()), "detailed": errors.tolist()}
    return results


def evaluate_submission(
    folder: str | Path, root: str | Path, config: EvaluationConfig
) -> dict[str, Any]:
    """Score a submission folder as the challenge's evaluation does.

    Args:
        folder: the submission (``disp_*.nii.gz`` or ``.npz``).
        root: the task folder the ``config`` paths are relative to.

    Returns:
        ``{"name", "aggregates": {metric: {"mean", "std", "30"}}, "cases": {case_key: metric
        results of :func:`evaluate_pair`}}``.

    Raises:
        DataError: a missing field or ground-truth file, or a field of the wrong shape.
    """
    cases = {}
    for fixed, moving in config.pairs:
        path = find_displacement(folder, fixed, moving)
        disp = read_displacement(path)
        if config.expected_shape is not None and disp.shape != config.expected_shape:
            raise DataError(f"{path}: shape {disp.shape}, the task expects {config.expected_shape}")
        cases[case_key(fixed, moving)] = evaluate_pair(disp, root, fixed, moving, config)
    aggregates = {}
    for method in config.methods:
        means = np.array([case[method["name"]]["mean"] for case in cases.values()])
        quantile = AGGREGATE_QUANTILE[method["metric"]]
        aggregates[method["name"]] = {
            "mean": float(means.mean()),
            "std": float(means.std()),
            "30": float(np.quantile(means, quantile)),
        }
    return {"name": config.task_name, "aggregates": aggregates, "cases": cases}


def aggregates_markdown(results: dict[str, Any]) -> str:
    """The aggregates of :func:`evaluate_submission` as a Markdown table."""
    lines = ["| Learn2Reg metric | mean | std | 30 % |", "|---|---|---|---|"]
    for name, values in results["aggregates"].items():
        cells = " | ".join(f"{values[k]:.5f}" for k in ("mean", "std", "30"))
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"
