"""Datasets of registration pairs and the Lightning DataModule that serves them.

Item layout (dict of tensors without batch axis) is documented in ``docs/architecture.md``.
"""

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
from regnet.data.synthetic import SyntheticPairs

__all__ = [
    "EpochSampler",
    "RegistrationDataModule",
    "SyntheticPairs",
    "seed_worker",
]
