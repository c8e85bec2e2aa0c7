"""Lightning DataModule wrapping any registration datasets (synthetic or loaded from files).

Datasets return items as described in ``docs/architecture.md`` (dicts of tensors without batch
axis); the default collate stacks them into batches. A dataset may declare the attributes
``ndim``, ``num_labels``, ``in_channels`` and ``shape``; when it does they are checked against the
DataModule's, so a config that mixes 2D data with a 3D model fails at construction.

A dataset that sets ``unlimited = True`` (e.g. :class:`regnet.data.synthetic.SyntheticPairs`)
accepts any index ``>= 0`` and returns a distinct item for each; its training epochs then use
indices ``epoch * len + permutation``, so every epoch sees new items.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _mixed_seed(*values: int) -> int:
    """One 64-bit seed from several integers (independent streams for neighbouring inputs)."""
    return int(np.random.SeedSequence(values).generate_state(1, dtype=np.uint64)[0])


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed ``random`` and ``numpy`` from the worker's torch seed.

    PyTorch already gives each worker ``torch.initial_seed() = base_seed + worker_id``, with
    ``base_seed`` drawn from the loader's generator; this extends it to the other libraries.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class EpochSampler(Sampler[int]):
    """Shuffled indices, a new order each epoch, reproducible from ``(seed, epoch)``.

    Yields a permutation of ``range(size)``, shifted by ``epoch * size`` when ``fresh_indices``
    (for unlimited datasets). Lightning calls :meth:`set_epoch` before each epoch; without it
    (e.g. a plain PyTorch loop) each pass advances the epoch by one.
    """

    def __init__(self, size: int, seed: int = 0, fresh_indices: bool = False) -> None:
        if size < 1:
            raise ValueError(f"EpochSampler: size must be >= 1, got {size}")
        self.size = int(size)
        self.seed = int(seed)
        self.fresh_indices = bool(fresh_indices)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order (and, with ``fresh_indices``, the items) of epoch ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_mixed_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator)
        if self.fresh_indices:
            order = order + self.epoch * self.size
        self.epoch += 1
        return iter(order.tolist())


class RegistrationDataModule(lightning.LightningDataModule):
    """Train / validation / test datasets of registration pairs, as Lightning dataloaders.

    Args:
        train, val: datasets of pair items (see module docstring).
        test: optional test dataset; ``test_dataloader`` raises if it is missing.
        ndim: spatial dimensionality of the items (2 or 3).
        num_labels: number of label values including background (0 if the items have no labels).
        in_channels: image channels ``C`` of ``fixed`` and ``moving``.
        shape: spatial size of every item (network grid), or ``None`` when sizes vary.
        batch_size: items per batch (all loaders).
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory; ``None`` means "when CUDA is available".
        persistent_workers: keep workers alive between epochs; ``None`` means
            "when ``num_workers > 0``".
        seed: seed of the training order and of the workers' random generators.
        root: the dataset's root folder (``data.root`` in the configs, from which the datasets'
            paths are interpolated); stored as ``root`` for the record.

    ``ndim``, ``num_labels``, ``in_channels`` and ``shape`` are exposed as attributes for model
    configs (``${data.ndim}`` etc. in Hydra).
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset,
        test: Dataset | None = None,
        *,
        ndim: int,
        num_labels: int = 0,
        in_channels: int = 1,
        shape: Sequence[int] | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        seed: int = 0,
        root: str | None = None,
    ) -> None:
        super().__init__()
        self.root = root
        if ndim not in (2, 3):
            raise ValueError(f"RegistrationDataModule: ndim must be 2 or 3, got {ndim}")
        if num_labels < 0:
            raise ValueError(f"RegistrationDataModule: num_labels must be >= 0, got {num_labels}")
        if in_channels < 1:
            raise ValueError(f"RegistrationDataModule: in_channels must be >= 1, got {in_channels}")
        if batch_size < 1:
            raise ValueError(f"RegistrationDataModule: batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"RegistrationDataModule: num_workers must be >= 0, got {num_workers}")
        self.ndim = int(ndim)
        self.num_labels = int(num_labels)
        self.in_channels = int(in_channels)
        self.shape = None if shape is None else tuple(int(n) for n in shape)
        if self.shape is not None and len(self.shape) != self.ndim:
            raise ValueError(
                f"RegistrationDataModule: shape {list(self.shape)} does not have ndim={ndim} "
                "entries"
            )
        self.train = train
        self.val = val
        self.test = test
        for split, dataset in (("train", train), ("val", val), ("test", test)):
            if dataset is not None:
                self._check_dataset(split, dataset)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.seed = int(seed)

    def _check_dataset(self, split: str, dataset: Dataset) -> None:
        if len(dataset) < 1:
            raise ValueError(f"RegistrationDataModule: the {split} dataset is empty")
        for name in ("ndim", "num_labels", "in_channels", "shape"):
            declared = getattr(dataset, name, None)
            expected = getattr(self, name)
            if declared is None or expected is None:
                continue
            if name == "shape":
                declared = tuple(int(n) for n in declared)
            if declared != expected:
                raise ValueError(
                    f"RegistrationDataModule: the {split} dataset has {name}={declared} "
                    f"but the data module was given {name}={expected}"
                )

    def _loader(self, dataset: Dataset, sampler: Sampler[int] | None) -> DataLoader:
        pin_memory = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        persistent = (
            self.num_workers > 0 if self.persistent_workers is None else self.persistent_workers
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent and self.num_workers > 0,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled each epoch; fresh items each epoch for ``unlimited`` datasets."""
        sampler = EpochSampler(
            len(self.train), self.seed, fresh_indices=getattr(self.train, "unlimited", False)
        )
        return self._loader(self.train, sampler)

    def val_dataloader(self) -> DataLoader:
        """In dataset order, the same items every epoch."""
        return self._loader(self.val, None)

    def test_dataloader(self) -> DataLoader:
        """In dataset order; raises ``ValueError`` when no test dataset was given."""
        if self.test is None:
            raise ValueError("RegistrationDataModule: no test dataset was given (test=None)")
        return self._loader(self.test, None)
