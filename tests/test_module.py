import io
import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from regnet.data import SyntheticPairs
from regnet.module import RegistrationModule
from regnet.nets import VoxelMorph
from regnet.spatial import warp
from regnet.visualize import make_panel

SHAPE = (24, 20)
NUM_LABELS = 4
TINY_UNET = {"enc_channels": [8, 16], "dec_channels": [16, 16, 16, 8]}


class FixedField(nn.Module):
    """A 'network' that always returns the same field ``(ndim, *S)``, as a trainable parameter."""

    def __init__(self, ddf: torch.Tensor) -> None:
        super().__init__()
        self.ddf = nn.Parameter(ddf.clone())

    def forward(self, fixed, moving):
        return {"ddf": self.ddf.expand(fixed.shape[0], *self.ddf.shape)}


class WithoutKeys(Dataset):
    def __init__(self, dataset, keys):
        self.dataset, self.keys = dataset, set(keys)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {k: v for k, v in self.dataset[index].items() if k not in self.keys}


def pairs(length=2, seed=0, **options):
    return SyntheticPairs(
        SHAPE, num_labels=NUM_LABELS, length=length, seed=seed, label_spacing=5.0, **options
    )


def trainer(tmp_path, logger=False, **kwargs):
    options = dict(
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**options, **kwargs})


def shift(array: np.ndarray, offsets) -> np.ndarray:
    """``out[x] = array[clip(x + offsets)]``: backward integer translation, border padding."""
    index = np.indices(array.shape)
    clipped = [np.clip(index[a] + offsets[a], 0, array.shape[a] - 1) for a in range(array.ndim)]
    return array[tuple(clipped)]


def test_validation_metrics_match_independent_computation(tmp_path):
    offsets = (2, -1)
    ddf = torch.tensor(offsets, dtype=torch.float32).view(2, 1, 1).expand(2, *SHAPE)
    module = RegistrationModule(FixedField(ddf), loss="ncc+grad", loss_weights={"grad": 0.5})
    data = pairs()
    (metrics,) = trainer(tmp_path).validate(module, DataLoader(data, batch_size=2), verbose=False)

    dice, mse, ncc = [], [], []
    for item in data:
        fixed, moving = item["fixed"][0].numpy(), item["moving"][0].numpy()
        warped = shift(moving, offsets)
        mse.append(np.mean((warped - fixed) ** 2))
        ncc.append(np.corrcoef(warped.ravel(), fixed.ravel())[0, 1])
        true = item["fixed_label"][0].numpy()
        pred = shift(item["moving_label"][0].numpy(), offsets)
        labels = sorted((set(np.unique(true)) | set(np.unique(pred))) - {0})
        scores = [
            2 * np.sum((pred == k) & (true == k)) / (np.sum(pred == k) + np.sum(true == k))
            for k in labels
        ]
        dice.append(np.mean(scores))
    assert metrics["val/dice"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert metrics["val/mse"] == pytest.approx(np.mean(mse), rel=1e-5)
    assert metrics["val/ncc"] == pytest.approx(np.mean(ncc), abs=1e-5)
    assert metrics["val/loss_ncc"] == pytest.approx(-np.mean(ncc), abs=1e-5)
    assert metrics["val/loss_grad"] == pytest.approx(0.0, abs=1e-12)  # constant field
    assert metrics["val/loss"] == pytest.approx(metrics["val/loss_ncc"], abs=1e-7)
    assert metrics["val/folding_percent"] == 0.0
    assert metrics["val/sdlogj"] == pytest.approx(0.0, abs=1e-9)


def test_similarity_targets_replace_the_inputs_in_the_similarity_only():
    """With fixed_target/moving_target in the batch, `mse` compares the warped moving target
    with the fixed target, while the network still receives fixed and moving."""
    offsets = (2, -1)
    ddf = torch.tensor(offsets, dtype=torch.float32).view(2, 1, 1).expand(2, *SHAPE)
    seen = {}

    class Recording(FixedField):
        def forward(self, fixed, moving):
            seen["fixed"], seen["moving"] = fixed, moving
            return super().forward(fixed, moving)

    module = RegistrationModule(Recording(ddf), loss="mse")
    generator = torch.Generator().manual_seed(0)
    batch = {k: torch.rand(1, 1, *SHAPE, generator=generator) for k in ("fixed", "moving")}
    batch["fixed_target"] = torch.rand(1, 1, *SHAPE, generator=generator)
    batch["moving_target"] = torch.rand(1, 1, *SHAPE, generator=generator)
    total, _ = module._loss(module._register(batch))
    warped = shift(batch["moving_target"][0, 0].numpy(), offsets)
    expected = np.mean((warped - batch["fixed_target"][0, 0].numpy()) ** 2)
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    assert seen["fixed"] is batch["fixed"] and seen["moving"] is batch["moving"]
    plain = {k: batch[k] for k in ("fixed", "moving")}
    on_inputs = np.mean(
        (shift(plain["moving"][0, 0].numpy(), offsets) - plain["fixed"][0, 0].numpy()) ** 2
    )
    assert float(module._loss(module._register(plain))[0].detach()) == pytest.approx(
        on_inputs, rel=1e-5
    )


def test_folding_field_is_counted(tmp_path):
    # u_0 = -2 i: d(i + u_0)/di = -1, so det J = -1 at every voxel.
    ddf = torch.zeros(2, *SHAPE)
    ddf[0] = -2.0 * torch.arange(SHAPE[0], dtype=torch.float32).view(-1, 1)
    module = RegistrationModule(FixedField(ddf), loss="mse")
    (metrics,) = trainer(tmp_path).validate(module, DataLoader(pairs(1)), verbose=False)
    assert metrics["val/folding_percent"] == 100.0


@pytest.mark.parametrize(
    ("loss", "dropped", "missing"),
    [
        ("dice+grad", ["fixed_label", "moving_label"], "loss term 'dice' needs inputs fixed_label"),
        ("ncc+ddf", ["target_ddf"], "loss term 'ddf' needs inputs target_ddf"),
    ],
)
def test_missing_loss_input_fails_before_any_step(tmp_path, loss, dropped, missing):
    model = VoxelMorph(2, **TINY_UNET)
    before = [p.detach().clone() for p in model.parameters()]
    module = RegistrationModule(model, loss=loss, num_labels=NUM_LABELS)
    loader = DataLoader(WithoutKeys(pairs(), dropped), batch_size=2)
    fit = trainer(tmp_path, max_steps=1, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=missing) as error:
        fit.fit(module, train_dataloaders=loader)
    assert "train data cannot feed loss" in str(error.value)
    assert fit.global_step == 0
    for old, new in zip(before, model.parameters(), strict=True):
        assert torch.equal(old, new)


def test_labels_beyond_num_labels_fail_clearly(tmp_path):
    module = RegistrationModule(VoxelMorph(2, **TINY_UNET), loss="dice", num_labels=2)
    fit = trainer(tmp_path, max_steps=1, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=r"fixed_label holds label 3 but num_labels is 2"):
        fit.fit(module, train_dataloaders=DataLoader(pairs(1)))


def test_constructor_rejects_bad_settings():
    model = FixedField(torch.zeros(2, *SHAPE))
    with pytest.raises(ValueError, match="num_labels is 0"):
        RegistrationModule(model, loss="dice+grad", num_labels=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        RegistrationModule(model, optimizer="sgd")
    with pytest.raises(ValueError, match="scheduler must be one of"):
        RegistrationModule(model, scheduler="step")


class Losses(Callback):
    def __init__(self):
        self.values, self.lrs = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def test_overfits_one_pair(tmp_path):
    torch.manual_seed(0)
    module = RegistrationModule(
        VoxelMorph(2, **TINY_UNET),
        loss="mse+dice+grad",
        loss_weights={"grad": 0.01},
        num_labels=NUM_LABELS,
        lr=3e-3,
    )
    one_pair = DataLoader(pairs(1, same_contrast=True))
    losses = Losses()
    fit = trainer(tmp_path, max_steps=30, callbacks=[losses], num_sanity_val_steps=0)
    fit.fit(module, train_dataloaders=one_pair)
    assert len(losses.values) == 30
    assert np.mean(losses.values[-5:]) < 0.6 * losses.values[0]


def test_cosine_schedule_over_all_steps(tmp_path):
    module = RegistrationModule(
        FixedField(torch.zeros(2, *SHAPE)), loss="mse", lr=0.1, scheduler="cosine"
    )
    losses = Losses()
    fit = trainer(tmp_path, max_steps=4, callbacks=[losses], num_sanity_val_steps=0)
    fit.fit(module, train_dataloaders=DataLoader(pairs(4)))
    expected = [0.1 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    np.testing.assert_allclose(losses.lrs, expected, rtol=1e-6)


def test_geometry_and_loss_stay_float32_under_bf16_autocast():
    module = RegistrationModule(VoxelMorph(2, **TINY_UNET), loss="lncc+dice", num_labels=4)
    batch = next(iter(DataLoader(pairs(), batch_size=2)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = module._register(batch)
        total, _ = module._loss(inputs)
    for key in ("warped", "ddf", "warped_label", "fixed_label"):
        assert inputs[key].dtype == torch.float32, key
    assert total.dtype == torch.float32
    torch.testing.assert_close(inputs["warped"], warp(batch["moving"], inputs["ddf"]))


def test_panel_is_logged_for_first_validation_pair(tmp_path):
    ddf = torch.tensor([1.0, 2.0]).view(2, 1, 1).expand(2, *SHAPE)
    module = RegistrationModule(FixedField(ddf), loss="mse", val_panel_every_n_epochs=2)
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    data = pairs(3)
    # one step per epoch, validation after each: panels at validation runs 0 and 2
    fit = trainer(tmp_path, logger=logger, max_steps=3, num_sanity_val_steps=0)
    fit.fit(module, DataLoader(pairs(1, seed=5)), DataLoader(data, batch_size=2))
    fit.validate(module, DataLoader(data, batch_size=2))  # outside fitting: no panel
    logger.experiment.flush()

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    panels = events.Images("val/panel")
    assert [event.step for event in panels] == [1, 3]
    event = panels[-1]
    logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    item = data[0]
    trained = module.model.ddf.detach()  # the field after the last training step
    warped = warp(item["moving"][None], trained[None])[0]
    expected = make_panel(item["fixed"], item["moving"], warped, trained).image
    expected = expected.permute(1, 2, 0).numpy()
    assert logged.shape == expected.shape
    assert np.abs(logged.astype(float) - expected * 255).max() <= 1.0


class WithAffine(Dataset):
    """Items of ``dataset`` with a ``fixed_affine``, as file datasets give them."""

    def __init__(self, dataset, affine):
        self.dataset, self.affine = dataset, torch.as_tensor(affine, dtype=torch.float64)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], "fixed_affine": self.affine}


def logged_panels(folder) -> list[np.ndarray]:
    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    return [
        np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        for event in events.Images("val/panel")
    ]


def test_panel_is_oriented_with_the_batch_affine(tmp_path):
    """A 2D network grid stored with x flipped (a coronal slice, as file datasets give it) is
    drawn as the overview draws that file: same rendering, oriented by the affine."""
    ddf = torch.zeros(2, *SHAPE)
    module = RegistrationModule(FixedField(ddf), loss="mse", lr=1e-9)
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    flipped = np.array([[-1.0, 0, 0, 23.0], [0, 0, 1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    data = WithAffine(pairs(1), flipped)
    fit = trainer(tmp_path, logger=logger, max_steps=1, num_sanity_val_steps=0)
    fit.fit(module, DataLoader(pairs(1, seed=5)), DataLoader(data))
    logger.experiment.flush()
    (logged,) = logged_panels(tmp_path / "tb")
    item = data[0]
    trained = module.model.ddf.detach()
    warped = warp(item["moving"][None], trained[None])[0]
    expected = make_panel(item["fixed"], item["moving"], warped, trained, flipped).image
    expected = expected.permute(1, 2, 0).numpy()
    assert logged.shape == expected.shape
    assert np.abs(logged.astype(float) - expected * 255).max() <= 1.0
    unoriented = make_panel(item["fixed"], item["moving"], warped, trained).image
    unoriented = unoriented.permute(1, 2, 0)
    assert unoriented.shape == expected.shape  # same layout, the image mirrored
    assert np.abs(unoriented.numpy() - expected).max() > 0.5


def test_checkpoint_rebuilds_model_from_stored_config(tmp_path):
    model_config = {"_target_": "regnet.nets.VoxelMorph", "ndim": 2, **TINY_UNET}
    # settings given as OmegaConf objects (as Hydra composes them) are stored as plain containers
    config = OmegaConf.create({"model": model_config, "data": {"shape": [16, 16]}})
    module = RegistrationModule(
        VoxelMorph(2, **TINY_UNET),
        loss="ncc+grad",
        loss_options=OmegaConf.create({"ncc": {}}),
        config=config,
    )
    fit = trainer(tmp_path, max_steps=1, num_sanity_val_steps=0)
    fit.fit(module, train_dataloaders=DataLoader(pairs(1)))
    path = tmp_path / "model.ckpt"
    fit.save_checkpoint(path)
    state = torch.load(path, weights_only=True)
    assert state["regnet_version"]
    assert state["hyper_parameters"]["config"]["data"] == {"shape": [16, 16]}
    assert type(state["hyper_parameters"]["loss_options"]) is dict

    restored = RegistrationModule.from_checkpoint(path)
    assert restored.hparams.loss == "ncc+grad"
    batch = pairs(1)[0]
    fixed, moving = batch["fixed"][None], batch["moving"][None]
    module.eval()
    torch.testing.assert_close(restored(fixed, moving)["ddf"], module(fixed, moving)["ddf"])

    bare = tmp_path / "bare.ckpt"
    torch.save({"hyper_parameters": {}}, bare)
    with pytest.raises(ValueError, match="holds no model config"):
        RegistrationModule.from_checkpoint(bare)


@pytest.mark.parametrize("shape", [(16, 12), (8, 12, 10)])
def test_label_downsize_compares_cell_averaged_labels(shape):
    """A constant even translation moves whole cells: the warped cell-averaged moving labels
    equal the cell-averaged fixed labels (away from the border)."""
    ndim, f, k = len(shape), 2, 3
    offsets = [2, -4, 2][:ndim]
    moving = np.random.default_rng(0).integers(0, k, size=shape)
    fixed = shift(moving, offsets)
    ddf = torch.tensor(offsets, dtype=torch.float32).view(ndim, *[1] * ndim).expand(ndim, *shape)
    module = RegistrationModule(FixedField(ddf), loss="dice", num_labels=k, label_downsize=f)
    batch = {
        "fixed": torch.zeros(1, 1, *shape),
        "moving": torch.zeros(1, 1, *shape),
        "fixed_label": torch.from_numpy(fixed)[None, None],
        "moving_label": torch.from_numpy(moving)[None, None],
    }
    inputs = module._register(batch)
    cells = tuple(n // f for n in shape)
    assert inputs["fixed_label"].shape == (1, k, *cells)
    assert inputs["warped_label"].shape == (1, k, *cells)
    split_cells = [size for n in cells for size in (n, f)]  # axis a -> (cell, voxel in cell)
    expected = np.stack([(fixed == c).reshape(split_cells) for c in range(k)])
    expected = expected.mean(axis=tuple(range(2, 2 * ndim + 1, 2)))
    np.testing.assert_allclose(inputs["fixed_label"][0].numpy(), expected, atol=1e-6)
    inner = (slice(None),) + tuple(slice(3, n - 3) for n in cells)
    warped = inputs["warped_label"][0].detach().numpy()
    np.testing.assert_allclose(warped[inner], expected[inner], atol=1e-5)
    with pytest.raises(ValueError, match="label_downsize must be an integer >= 1"):
        RegistrationModule(FixedField(ddf), loss="dice", num_labels=k, label_downsize=0)
