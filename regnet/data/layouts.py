"""Registration datasets over the file layouts users have: a pair list, a folder, Learn2Reg.

All layouts share :class:`RegistrationPairs`: every distinct subject (image + optional label,
mask, landmarks) is validated from its headers when the dataset is built, preprocessed once by
:func:`regnet.data.preprocess.subject_transform` (and cached per ``cache``), and items pair two
preprocessed subjects with :func:`regnet.data.preprocess.pair_item`:

* ``fixed``, ``moving`` ``(1, *S)`` float32 in [0, 1];
* ``fixed_label``, ``moving_label`` ``(1, *S)`` int64 and ``fixed_mask``, ``moving_mask``
  ``(1, *S)`` float32, when both subjects have them;
* ``fixed_landmarks``, ``moving_landmarks`` ``(N, 3)`` float64 RAS mm (see
  :mod:`regnet.data.io`), when both have them and no augmentation moved the anatomy; ``N`` varies
  per subject, so use batch size 1 for them;
* ``fixed_affine``, ``moving_affine`` ``(4, 4)`` float64 voxel -> RAS mm of the network grids;
* ``fixed_path``, ``moving_path``: source image files (strings; default collate makes lists).

Caching (``cache``): ``"none"`` preprocesses on every access, ``"memory"`` keeps every
preprocessed subject in RAM (MONAI ``CacheDataset``, filled at construction), ``"disk"`` stores
them under ``cache_dir`` (MONAI ``PersistentDataset``; the preprocessing settings are part of the
cache key). Augmentation runs after the cache, independently for the fixed and the moving subject.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from monai.data import CacheDataset, PersistentDataset
from monai.data import Dataset as MonaiDataset
from torch.utils.data import Dataset

from regnet.data.io import IMAGE_SUFFIXES, DataError, read_pair_list
from regnet.data.preprocess import (
    pair_item,
    raise_data_error,
    subject_record,
    subject_transform,
)

_SUBJECT_FIELDS = ("image", "label", "mask", "landmarks")


def _is_image(path: Path) -> bool:
    return path.is_file() and any(path.name.endswith(s) for s in IMAGE_SUFFIXES)


def _stem(path: Path) -> str:
    for suffix in IMAGE_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


class RegistrationPairs(Dataset):
    """Pairs of preprocessed subjects; the layouts below build its subject and pair lists.

    Args:
        subjects: per subject ``{"image": path, "label"?: path, "mask"?: path, "landmarks"?:
            path, "row": description used in error messages}``.
        pairs: ``(fixed_index, moving_index)`` into ``subjects``; ``None`` draws random
            inter-subject pairs: item ``i`` has fixed subject ``i % n`` and a moving subject drawn
            from the other ones (``len`` is ``pairs_per_epoch``, default ``n``).
        ndim, spacing, shape, percentiles, slice_index, centre: preprocessing, see
            :func:`regnet.data.preprocess.subject_transform`.
        augmentation: a transform of subject records (e.g.
            :func:`regnet.data.augment.build_augmentation`), or ``None``.
        cache: ``"none"``, ``"memory"`` or ``"disk"``; ``cache_dir`` for ``"disk"``.
        cache_workers: processes filling the memory cache.
        seed: random pairs and augmentation of item ``i`` are drawn from ``(seed, i)``.

    Random pairs or augmentation make the dataset ``unlimited`` (the protocol of
    :class:`regnet.data.RegistrationDataModule`): any index ``i >= 0`` is valid, item ``i`` is a
    deterministic function of ``(seed, i)`` whatever the worker, and index ``i`` beyond ``len``
    reuses pair ``i % len`` with new random draws, so every epoch sees new pairs/augmentations.
    """

    in_channels = 1

    def __init__(
        self,
        subjects: Sequence[dict],
        pairs: Sequence[tuple[int, int]] | None = None,
        *,
        ndim: int = 3,
        spacing: Sequence[float] | float | None = None,
        shape: Sequence[int] | None = None,
        percentiles: Sequence[float] | None = (1.0, 99.0),
        slice_index: int | None = None,
        centre: str = "grid",
        augmentation: Callable[[dict], dict] | None = None,
        cache: str = "none",
        cache_dir: str | Path | None = None,
        cache_workers: int = 0,
        pairs_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        if not subjects:
            raise DataError("dataset has no subjects")
        self.ndim = int(ndim)
        spacing = None if spacing is None else (spacing if np.isscalar(spacing) else list(spacing))
        shape = None if shape is None else [int(s) for s in shape]
        percentiles = None if percentiles is None else tuple(float(p) for p in percentiles)
        transform = subject_transform(self.ndim, spacing, shape, percentiles, slice_index, centre)
        settings = json.dumps([self.ndim, spacing, shape, percentiles, slice_index, centre])
        records = []
        for subject in subjects:
            record = subject_record(
                subject["image"],
                subject.get("label"),
                subject.get("mask"),
                subject.get("landmarks"),
                ndim=self.ndim,
                slice_index=slice_index,
                row=str(subject.get("row", subject["image"])),
            )
            record["preprocessing"] = settings  # part of the disk-cache key
            records.append(record)
        self.subjects = records
        self.pairs = None if pairs is None else [(int(f), int(m)) for f, m in pairs]
        if self.pairs is None and len(records) < 2:
            raise DataError("random pairs need at least 2 subjects")
        if self.pairs is not None and not self.pairs:
            raise DataError("dataset has no pairs")
        self.pairs_per_epoch = int(pairs_per_epoch or len(records))
        try:
            self.store = self._build_store(records, transform, cache, cache_dir, cache_workers)
        except RuntimeError as error:
            raise_data_error(error)
        self.augmentation = augmentation
        self.seed = int(seed)
        self.shape = None if shape is None else tuple(shape)
        self.unlimited = self.pairs is None or augmentation is not None

    @staticmethod
    def _build_store(records, transform, cache, cache_dir, cache_workers) -> MonaiDataset:
        if cache == "none":
            return MonaiDataset(records, transform)
        if cache == "memory":
            return CacheDataset(
                records, transform, num_workers=cache_workers or None, progress=False
            )
        if cache == "disk":
            if cache_dir is None:
                raise ValueError("cache='disk' needs cache_dir")
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            return PersistentDataset(records, transform, cache_dir=cache_dir)
        raise ValueError(f"cache must be 'none', 'memory' or 'disk', got {cache!r}")

    def __len__(self) -> int:
        return self.pairs_per_epoch if self.pairs is None else len(self.pairs)

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence((self.seed, index, stream)))

    def pair_indices(self, index: int) -> tuple[int, int]:
        """Subject indices ``(fixed, moving)`` of item ``index``."""
        if self.pairs is not None:
            return self.pairs[index % len(self.pairs)]
        n = len(self.subjects)
        fixed = index % n
        moving = (fixed + 1 + int(self._rng(index, 0).integers(n - 1))) % n
        return fixed, moving

    def _subject(self, subject: int, index: int, stream: int) -> dict:
        try:
            record = dict(self.store[subject])
        except RuntimeError as error:
            raise_data_error(error)
        if self.augmentation is not None:
            if hasattr(self.augmentation, "set_random_state"):
                seed = int(self._rng(index, stream).integers(2**31 - 1))
                self.augmentation.set_random_state(seed=seed)
            record = self.augmentation(record)
        return record

    def __getitem__(self, index: int) -> dict:
        if index < 0 or (index >= len(self) and not self.unlimited):
            raise IndexError(f"index {index} outside 0..{len(self) - 1}")
        fixed, moving = self.pair_indices(index)
        return pair_item(self._subject(fixed, index, 1), self._subject(moving, index, 2))


def _subject_index(subjects: list[dict], index: dict[tuple, int], subject: dict) -> int:
    key = tuple(subject.get(field) for field in _SUBJECT_FIELDS)
    if key not in index:
        index[key] = len(subjects)
        subjects.append(subject)
    return index[key]


class PairListDataset(RegistrationPairs):
    """Pairs listed in a CSV (header row) or a JSON list of objects.

    Columns: ``fixed``, ``moving`` (required) and optional ``fixed_label``, ``moving_label``,
    ``fixed_mask``, ``moving_mask``, ``fixed_landmarks``, ``moving_landmarks``. Relative paths
    are resolved against ``root`` if given, else the list's folder. Rows are numbered from 1
    (header excluded) in error messages. Other keyword arguments go to
    :class:`RegistrationPairs`.
    """

    def __init__(self, list_path: str | Path, root: str | Path | None = None, **kwargs) -> None:
        list_path = Path(list_path)
        base = Path(root) if root is not None else list_path.parent
        subjects: list[dict] = []
        index: dict[tuple, int] = {}
        pairs = []
        for number, row in enumerate(read_pair_list(list_path), start=1):
            where = f"{list_path} row {number}"
            ends = []
            for role in ("fixed", "moving"):
                if role not in row:
                    raise DataError(f"{where}: column '{role}' is missing or empty")
                subject = {"row": where, "image": str(base / row[role])}
                for field in ("label", "mask", "landmarks"):
                    if f"{role}_{field}" in row:
                        subject[field] = str(base / row[f"{role}_{field}"])
                ends.append(_subject_index(subjects, index, subject))
            pairs.append(tuple(ends))
        super().__init__(subjects, pairs, **kwargs)


class FolderDataset(RegistrationPairs):
    """Subjects in a folder of images, labels (and masks) matched by file name in sibling folders.

    Args:
        root: dataset folder.
        images, labels, masks: sub-folders of ``root`` (``labels``/``masks`` ``None`` or missing
            folder: not used). Every image needs a label (mask) of the same file name when the
            folder is used.
        split: ``"train"``, ``"val"`` or ``"all"``; the last ``num_val`` subjects in file-name
            order are the validation subjects.
        atlas, atlas_label: register every subject to this image (paths relative to ``root``;
            the label defaults to the file of the atlas's name in ``labels``, if any);
            the atlas is the fixed image when ``atlas_role="fixed"`` (the moving one otherwise).
            Without an atlas, training draws random inter-subject pairs on every access and
            validation uses ``num_pairs`` pairs fixed by ``seed``.
        Other keyword arguments go to :class:`RegistrationPairs`.
    """

    def __init__(
        self,
        root: str | Path,
        images: str = "images",
        labels: str | None = "labels",
        masks: str | None = None,
        split: str = "train",
        num_val: int = 0,
        atlas: str | None = None,
        atlas_label: str | None = None,
        atlas_role: str = "fixed",
        num_pairs: int | None = None,
        seed: int = 0,
        **kwargs,
    ) -> None:
        root = Path(root)
        image_dir = root / images
        if not image_dir.is_dir():
            raise DataError(f"{image_dir}: image folder not found")
        atlas_path = (root / atlas).resolve() if atlas else None
        files = sorted(p for p in image_dir.iterdir() if _is_image(p) and p.resolve() != atlas_path)
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        if not 0 <= num_val < len(files) or (split == "val" and num_val == 0):
            raise DataError(
                f"{image_dir}: {len(files)} images cannot give num_val={num_val} for split={split}"
            )
        cut = len(files) - num_val
        files = {"train": files[:cut], "val": files[cut:], "all": files}[split]
        subjects = []
        for number, path in enumerate(files, start=1):
            subject = {"row": f"{image_dir} subject {number}", "image": str(path)}
            for field, folder in (("label", labels), ("mask", masks)):
                if folder is not None and (root / folder).is_dir():
                    subject[field] = str(root / folder / path.name)
            subjects.append(subject)
        if atlas:
            entry = {"row": f"{root} atlas", "image": str(root / atlas)}
            same_name = root / labels / Path(atlas).name if labels else None
            if atlas_label:
                entry["label"] = str(root / atlas_label)
            elif same_name is not None and same_name.is_file():
                entry["label"] = str(same_name)
            subjects.append(entry)
            n = len(subjects) - 1
            if atlas_role not in ("fixed", "moving"):
                raise ValueError(f"atlas_role must be 'fixed' or 'moving', got {atlas_role!r}")
            pairs = [(n, i) if atlas_role == "fixed" else (i, n) for i in range(n)]
        elif split == "train":
            pairs = None
        else:
            rng = np.random.default_rng(seed)
            n = len(subjects)
            if n < 2:
                raise DataError(f"{image_dir}: validation pairs need at least 2 subjects")
            count = num_pairs or n
            pairs = [(i % n, (i % n + 1 + int(rng.integers(n - 1))) % n) for i in range(count)]
        super().__init__(subjects, pairs, **kwargs)


class Learn2RegDataset(RegistrationPairs):
    """A Learn2Reg task from its ``dataset.json`` (e.g. ``OASIS_dataset.json``).

    Subjects come from the ``training`` (and ``test``) entries: ``image`` plus, when present,
    ``label``, ``mask`` and the keypoint field ``keypoints_key`` (Learn2Reg keypoints are CSVs of
    voxel indices; a ``.nii.gz`` name in the JSON is read as the ``.csv`` beside it). Without a
    ``label`` entry, ``labelsTr/<same name>`` is used if it exists. Splits:

    * ``"val"``: ``registration_val`` pairs; ``"test"``: ``registration_test`` pairs;
    * ``"train"``: ``training_paired_images`` (minus pairs touching validation images) for paired
      tasks, else random pairs among ``training`` images not used in ``registration_val``.

    ``shape`` defaults to ``tensorImageShape["0"]`` in 3D. Other keyword arguments go to
    :class:`RegistrationPairs`.
    """

    def __init__(
        self,
        dataset_json: str | Path,
        split: str = "train",
        use_labels: bool = True,
        use_masks: bool = False,
        keypoints_key: str | None = "keypoints",
        **kwargs,
    ) -> None:
        dataset_json = Path(dataset_json)
        if not dataset_json.is_file():
            raise DataError(f"{dataset_json}: Learn2Reg dataset.json not found")
        info = json.loads(dataset_json.read_text())
        base = dataset_json.parent
        if kwargs.get("ndim", 3) == 3 and kwargs.get("shape") is None:
            shapes = info.get("tensorImageShape") or {}
            if "0" in shapes:
                kwargs["shape"] = [int(s) for s in shapes["0"]]

        def resolve(relative: str) -> str:
            return str((base / relative).resolve())

        entries = {
            resolve(e["image"]): e
            for e in info.get("training", []) + info.get("test", [])
            if isinstance(e, dict) and "image" in e
        }

        subjects: list[dict] = []
        index: dict[tuple, int] = {}

        def subject(relative: str, where: str) -> int:
            path = resolve(relative)
            entry = entries.get(path, {})
            record = {"row": where, "image": path}
            label = entry.get("label")
            if label is None:
                guess = Path(path.replace("imagesTr", "labelsTr").replace("imagesTs", "labelsTs"))
                label = str(guess) if guess != Path(path) and guess.is_file() else None
            if use_labels and label is not None:
                record["label"] = resolve(label) if not Path(label).is_absolute() else label
            if use_masks and entry.get("mask"):
                record["mask"] = resolve(entry["mask"])
            if keypoints_key and entry.get(keypoints_key):
                points = Path(resolve(entry[keypoints_key]))
                if not points.is_file() and points.name.endswith(".nii.gz"):
                    points = points.with_name(points.name[: -len(".nii.gz")] + ".csv")
                record["landmarks"] = str(points)
            return _subject_index(subjects, index, record)

        val_pairs = info.get("registration_val") or []
        val_images = {resolve(p[k]) for p in val_pairs for k in ("fixed", "moving")}
        if split in ("val", "test"):
            key = f"registration_{split}"
            listed = info.get(key) or []
            pairs = [
                (
                    subject(p["fixed"], f"{dataset_json} {key}[{i}]"),
                    subject(p["moving"], f"{dataset_json} {key}[{i}]"),
                )
                for i, p in enumerate(listed)
            ]
            if not pairs:
                raise DataError(f"{dataset_json}: no '{key}' pairs")
        elif split == "train":
            paired = info.get("training_paired_images") or []
            paired = [
                (i, p)
                for i, p in enumerate(paired)
                if not {resolve(p["fixed"]), resolve(p["moving"])} & val_images
            ]
            if paired:
                pairs = [
                    (
                        subject(p["fixed"], f"{dataset_json} training_paired_images[{i}]"),
                        subject(p["moving"], f"{dataset_json} training_paired_images[{i}]"),
                    )
                    for i, p in paired
                ]
            else:
                for i, entry in enumerate(info.get("training", [])):
                    if resolve(entry["image"]) not in val_images:
                        subject(entry["image"], f"{dataset_json} training[{i}]")
                pairs = None
        else:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        super().__init__(subjects, pairs, **kwargs)
