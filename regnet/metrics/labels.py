"""Label-map agreement: Dice overlap and 95th-percentile Hausdorff distance per label.

Inputs are integer label maps of equal shape (2D or 3D, optionally with leading batch or channel
axes of size 1 for ``hd95``), numpy or torch. Label 0 is background and never scored. A label
absent from both maps is omitted from the result.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import torch

from regnet.metrics.arrays import ArrayLike, as_tensor


def _label_pair(pred_labels: ArrayLike, true_labels: ArrayLike) -> tuple[torch.Tensor, ...]:
    pred = as_tensor(pred_labels, "pred_labels")
    true = as_tensor(true_labels, "true_labels")
    if pred.shape != true.shape:
        raise ValueError(
            f"pred_labels {tuple(pred.shape)} and true_labels {tuple(true.shape)} differ in shape"
        )
    for name, tensor in (("pred_labels", pred), ("true_labels", true)):
        if tensor.is_floating_point() and not torch.equal(tensor, tensor.round()):
            raise ValueError(f"{name} must hold integer labels, got non-integer values")
    return pred.long(), true.long()


def _scored_labels(
    pred: torch.Tensor, true: torch.Tensor, labels: Iterable[int] | None
) -> list[int]:
    """Requested labels (default: all non-zero values) that occur in ``pred`` or ``true``."""
    present = set(torch.unique(pred).tolist()) | set(torch.unique(true).tolist())
    wanted = present if labels is None else {int(label) for label in labels}
    return sorted(label for label in wanted if label != 0 and label in present)


def dice_per_label(
    pred_labels: ArrayLike, true_labels: ArrayLike, labels: Iterable[int] | None = None
) -> dict[int, float]:
    """Dice ``2 |P ∩ T| / (|P| + |T|)`` for each label (default: every non-zero label present).

    Returns ``{label: dice}`` in ``[0, 1]``, omitting labels absent from both maps.
    """
    pred, true = _label_pair(pred_labels, true_labels)
    scored = _scored_labels(pred, true, labels)
    if not scored:
        return {}
    table = torch.tensor(scored)
    pred, true = pred.flatten(), true.flatten()

    def index(values: torch.Tensor) -> torch.Tensor:
        """Position of each value in ``table``, or ``len(table)`` for values not scored."""
        position = torch.searchsorted(table, values).clamp_max(len(scored) - 1)
        return torch.where(table[position] == values, position, len(scored))

    pred_index, true_index = index(pred), index(true)
    counts = len(scored) + 1
    pred_size = torch.bincount(pred_index, minlength=counts)[:-1]
    true_size = torch.bincount(true_index, minlength=counts)[:-1]
    overlap = torch.bincount(pred_index[pred == true], minlength=counts)[:-1]
    dice = 2.0 * overlap.double() / (pred_size + true_size).double()
    return dict(zip(scored, dice.tolist(), strict=True))


def hd95(
    pred_labels: ArrayLike,
    true_labels: ArrayLike,
    spacing: Sequence[float],
    labels: Iterable[int] | None = None,
) -> dict[int, float]:
    """Symmetric 95th-percentile Hausdorff distance between label surfaces, in mm, per label.

    Uses MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the two directed
    95th percentiles of boundary-voxel distances. ``spacing`` is the voxel size in mm along each
    spatial tensor axis (``len(spacing)`` = 2 or 3 trailing axes of the maps). A label present in
    only one map gets ``inf``; labels absent from both are omitted.
    """
    pred, true = _label_pair(pred_labels, true_labels)
    spacing = tuple(float(s) for s in spacing)
    ndim = len(spacing)
    if ndim not in (2, 3) or any(not s > 0 for s in spacing):
        raise ValueError(f"spacing must hold 2 or 3 positive voxel sizes in mm, got {spacing}")
    if pred.dim() < ndim or any(n != 1 for n in pred.shape[: pred.dim() - ndim]):
        raise ValueError(
            f"label maps of shape {tuple(pred.shape)} do not match a {ndim}D spacing {spacing}"
        )
    # Imported here: importing anything from MONAI takes seconds, and label maps are optional.
    from monai.metrics import compute_hausdorff_distance

    pred = pred.reshape(pred.shape[pred.dim() - ndim :])
    true = true.reshape(pred.shape)
    result = {}
    for label in _scored_labels(pred, true, labels):
        pred_mask, true_mask = pred == label, true == label
        if not (pred_mask.any() and true_mask.any()):
            result[label] = math.inf
            continue
        with warnings.catch_warnings():
            # MONAI warns about one of its own deprecated arguments on every call.
            warnings.simplefilter("ignore", FutureWarning)
            distance = compute_hausdorff_distance(
                pred_mask[None, None], true_mask[None, None], percentile=95, spacing=spacing
            )
        result[label] = float(distance.item())
    return result
