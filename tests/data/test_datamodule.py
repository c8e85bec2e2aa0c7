"""Tests of regnet.data.datamodule: batches, epochs, seeding, Hydra configs, Lightning hooks."""

from pathlib import Path

import lightning
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import Dataset

from regnet.data import EpochSampler, RegistrationDataModule, SyntheticPairs

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
TINY = ["data.train.length=8", "data.val.length=4", "data.batch_size=4"]


def compose_data(name: str, overrides: list[str]) -> RegistrationDataModule:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name=None, overrides=[f"+data={name}", *overrides])
    return instantiate(cfg.data)


class PlainPairs(Dataset):
    """A dataset without declared attributes, as a file-based loader might be."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        value = torch.full((1, 4, 4), float(index))
        return {"fixed": value, "moving": value.clone()}


def test_2d_config_instantiates_and_yields_batches():
    data = compose_data("synthetic", ["data.shape=[32,32]", *TINY])
    assert (data.ndim, data.num_labels, data.in_channels, data.shape) == (2, 10, 1, (32, 32))
    assert data.train.shape == data.val.shape == (32, 32)
    assert data.val.velocity_std == data.train.velocity_std  # shared through interpolation
    assert data.train.seed != data.val.seed
    batch = next(iter(data.train_dataloader()))
    assert batch["fixed"].shape == batch["moving"].shape == (4, 1, 32, 32)
    assert batch["fixed_label"].shape == (4, 1, 32, 32)
    assert batch["fixed_label"].dtype == torch.int64
    assert batch["target_ddf"].shape == (4, 2, 32, 32)
    assert 0 <= batch["fixed"].min() and batch["fixed"].max() <= 1
    assert batch["fixed_label"].max() < data.num_labels
    val_batches = list(data.val_dataloader())
    assert len(val_batches) == 1 and val_batches[0]["moving"].shape == (4, 1, 32, 32)


def test_3d_config_instantiates_and_yields_batches():
    data = compose_data("synthetic3d", ["data.shape=[12,12,12]", *TINY])
    assert (data.ndim, data.num_labels, data.shape) == (3, 12, (12, 12, 12))
    batch = next(iter(data.val_dataloader()))
    assert batch["fixed"].shape == (4, 1, 12, 12, 12)
    assert batch["target_ddf"].shape == (4, 3, 12, 12, 12)


def test_validation_items_are_fixed_and_training_items_fresh_each_epoch():
    dataset = SyntheticPairs((16, 16), num_labels=4, length=4, seed=0)
    data = RegistrationDataModule(
        dataset, SyntheticPairs((16, 16), num_labels=4, length=4, seed=1), ndim=2, num_labels=4
    )
    val = [batch["fixed"] for batch in data.val_dataloader()]
    again = [batch["fixed"] for batch in data.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(val, again, strict=True))
    assert torch.equal(val[0][0], data.val[0]["fixed"])
    loader = data.train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        epochs.append(torch.cat([batch["fixed"] for batch in loader]))
    expected = torch.stack([dataset[i]["fixed"] for i in range(4, 8)])
    assert sorted(epochs[1].sum((1, 2, 3)).tolist()) == sorted(expected.sum((1, 2, 3)).tolist())
    assert not any(torch.equal(a, b) for a in epochs[0] for b in epochs[1])


def test_epoch_sampler_orders():
    sampler = EpochSampler(10, seed=5)
    sampler.set_epoch(3)
    first = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == first  # reproducible from (seed, epoch)
    assert sorted(first) == list(range(10))
    assert list(sampler) != first  # without set_epoch a pass advances the epoch
    fresh = EpochSampler(10, seed=5, fresh_indices=True)
    fresh.set_epoch(3)
    assert list(fresh) == [i + 30 for i in first]


def test_generic_dataset_is_shuffled_without_fresh_indices():
    data = RegistrationDataModule(PlainPairs(6), PlainPairs(2), ndim=2, batch_size=2, seed=1)
    seen = torch.cat([batch["fixed"][:, 0, 0, 0] for batch in data.train_dataloader()])
    assert sorted(seen.tolist()) == list(range(6)) and seen.tolist() != list(range(6))


def test_workers_give_the_same_batches():
    dataset = SyntheticPairs((16, 16), num_labels=4, length=4)
    serial = RegistrationDataModule(dataset, dataset, ndim=2, num_labels=4, batch_size=2)
    parallel = RegistrationDataModule(
        dataset, dataset, ndim=2, num_labels=4, batch_size=2, num_workers=2
    )
    for a, b in zip(serial.train_dataloader(), parallel.train_dataloader(), strict=True):
        assert torch.equal(a["fixed"], b["fixed"])
        assert torch.equal(a["target_ddf"], b["target_ddf"])
    assert parallel.train_dataloader().persistent_workers


class RecordingModule(lightning.LightningModule):
    """Records the images it is given, to check which items Lightning's loops see."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_seen: list[list[float]] = []
        self.val_seen: list[list[float]] = []

    def on_train_epoch_start(self) -> None:
        self.train_seen.append([])

    def on_validation_epoch_start(self) -> None:
        self.val_seen.append([])

    def training_step(self, batch, batch_idx):
        self.train_seen[-1] += batch["fixed"].sum((1, 2, 3)).tolist()
        return (self.weight - 1) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_seen[-1] += batch["fixed"].sum((1, 2, 3)).tolist()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_draws_fresh_training_items_each_epoch(tmp_path):
    train = SyntheticPairs((16, 16), num_labels=4, length=4, seed=0)
    val = SyntheticPairs((16, 16), num_labels=4, length=2, seed=1)
    data = RegistrationDataModule(train, val, ndim=2, num_labels=4, batch_size=2)
    module = RecordingModule()
    trainer = lightning.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    for epoch, seen in enumerate(module.train_seen):
        expected = [float(train[i]["fixed"].sum()) for i in range(4 * epoch, 4 * epoch + 4)]
        assert sorted(seen) == pytest.approx(sorted(expected))
    assert module.val_seen[0] == module.val_seen[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ndim=3), "ndim=2"),
        (dict(ndim=2, num_labels=5), "num_labels=4"),
        (dict(ndim=2, num_labels=4, shape=(8, 8)), "shape"),
        (dict(ndim=4), "ndim must be 2 or 3"),
        (dict(ndim=2, batch_size=0), "batch_size"),
    ],
)
def test_inconsistent_arguments_raise(kwargs, message):
    dataset = SyntheticPairs((16, 16), num_labels=4, length=2)
    with pytest.raises(ValueError, match=message):
        RegistrationDataModule(dataset, dataset, **kwargs)


def test_missing_test_dataset_raises():
    data = RegistrationDataModule(PlainPairs(2), PlainPairs(2), ndim=2)
    with pytest.raises(ValueError, match="no test dataset"):
        data.test_dataloader()
    with_test = RegistrationDataModule(PlainPairs(2), PlainPairs(2), PlainPairs(3), ndim=2)
    assert len(list(with_test.test_dataloader())) == 3
