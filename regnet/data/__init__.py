"""Datasets of registration pairs and the Lightning DataModule that serves them.

Item layout (dict of tensors without batch axis) is documented in ``docs/architecture.md``.

The public names below are loaded on first use (PEP 562): most of them pull in MONAI or
Lightning, which take seconds to import, so ``from regnet.data.io import ...`` (all the
inference commands need) stays cheap while ``from regnet.data import SyntheticPairs`` works as
before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "build_augmentation": "regnet.data.augment",
    "EpochSampler": "regnet.data.datamodule",
    "RegistrationDataModule": "regnet.data.datamodule",
    "seed_worker": "regnet.data.datamodule",
    "DataError": "regnet.data.io",
    "read_landmarks": "regnet.data.io",
    "FolderDataset": "regnet.data.layouts",
    "Learn2RegDataset": "regnet.data.layouts",
    "PairListDataset": "regnet.data.layouts",
    "RegistrationPairs": "regnet.data.layouts",
    "load_pair": "regnet.data.preprocess",
    "subject_transform": "regnet.data.preprocess",
    "SyntheticPairs": "regnet.data.synthetic",
    "SynthBrainPairs": "regnet.data.synth_brain",
}
"""Public name -> the submodule that defines it."""

if TYPE_CHECKING:
    from regnet.data.augment import build_augmentation as build_augmentation
    from regnet.data.datamodule import EpochSampler, RegistrationDataModule, seed_worker
    from regnet.data.io import DataError as DataError
    from regnet.data.io import read_landmarks as read_landmarks
    from regnet.data.layouts import FolderDataset as FolderDataset
    from regnet.data.layouts import Learn2RegDataset as Learn2RegDataset
    from regnet.data.layouts import PairListDataset as PairListDataset
    from regnet.data.layouts import RegistrationPairs as RegistrationPairs
    from regnet.data.preprocess import load_pair as load_pair
    from regnet.data.preprocess import subject_transform as subject_transform
    from regnet.data.synth_brain import SynthBrainPairs
    from regnet.data.synthetic import SyntheticPairs

__all__ = [
    "EpochSampler",
    "RegistrationDataModule",
    "SynthBrainPairs",
    "SyntheticPairs",
    "seed_worker",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
