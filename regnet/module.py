"""Lightning wrapper that trains one registration network with one composite loss.

The loss spec chooses the supervision: image similarity terms (``ncc``, ``mi`` ...) make it
unsupervised, ``dice`` on warped one-hot labels weakly supervised, ``ddf`` (regression of the
known field) supervised; any sum of terms works. Before the first step of each stage the terms'
declared inputs are checked against what the batch provides.

Geometry (warping, Jacobians) and the loss always run in float32, also under bf16/fp16
autocast; only the network itself runs in reduced precision. Conventions for fields are those
of :mod:`regnet.spatial`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from regnet import __version__
from regnet.checkpoint import plain_container, read_checkpoint
from regnet.losses import build_loss, parse_spec
from regnet.metrics import dice_per_label, jacobian_stats
from regnet.spatial import warp, warp_labels
from regnet.spatial.warp import one_hot
from regnet.visualize import make_panel

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULERS = ("none", "cosine")
LABEL_INPUTS = ("fixed_label", "warped_label")
"""Loss inputs built from the batch's ``fixed_label`` and ``moving_label``."""


def available_loss_inputs(batch_keys: set[str] | Mapping[str, Any]) -> set[str]:
    """Loss input keys that :class:`RegistrationModule` can build from a batch with these keys.

    Always ``fixed``, ``moving``, ``warped``, ``ddf``; ``fixed_label`` and ``warped_label`` when
    the batch has both ``fixed_label`` and ``moving_label``; ``target_ddf`` and ``fixed_mask``
    when present.
    """
    keys = set(batch_keys)
    available = {"fixed", "moving", "warped", "ddf"}
    if {"fixed_label", "moving_label"} <= keys:
        available.update(LABEL_INPUTS)
    available.update(keys & {"target_ddf", "fixed_mask"})
    return available


def global_ncc(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalised cross-correlation of whole images, ``(B,)`` in ``[-1, 1]``; ``a, b (B,C,*S)``."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def pair_metrics(batch: Mapping[str, torch.Tensor], ddf: torch.Tensor) -> dict[str, float]:
    """Evaluation metrics of a batch, each computed per pair and averaged over the batch.

    ``folding_percent`` and ``sdlogj`` of ``ddf (B, ndim, *S)`` (see
    :func:`regnet.metrics.jacobian_stats`); with ``fixed_label`` and ``moving_label`` in the
    batch also ``dice``: the moving labels warped by nearest neighbour, Dice per non-zero label
    present in either map (:func:`regnet.metrics.dice_per_label`), averaged over labels.
    """
    ddf = ddf.detach()
    per_pair = [jacobian_stats(ddf[b : b + 1]) for b in range(ddf.shape[0])]
    metrics = {
        name: sum(stats[name] for stats in per_pair) / len(per_pair)
        for name in ("folding_percent", "sdlogj")
    }
    if "fixed_label" in batch and "moving_label" in batch:
        warped_label = warp_labels(batch["moving_label"], ddf, method="nearest")
        dice = []
        for b in range(ddf.shape[0]):
            scores = dice_per_label(warped_label[b], batch["fixed_label"][b])
            if scores:
                dice.append(sum(scores.values()) / len(scores))
        if dice:
            metrics["dice"] = sum(dice) / len(dice)
    return metrics


class RegistrationModule(L.LightningModule):
    """Trains ``model`` (``forward(fixed, moving) -> {"ddf": (B, ndim, *S), ...}``).

    Logged scalars (``<stage>`` is ``train``, ``val`` or ``test``):

    * ``<stage>/loss`` (weighted total) and ``<stage>/loss_<term>`` for every loss term
      (unweighted);
    * validation and test only: ``mse`` and ``ncc`` (global) of warped vs fixed image,
      and :func:`pair_metrics`: ``dice`` (when the batch has labels), ``folding_percent`` and
      ``sdlogj``.

    While fitting, at the first and then every ``val_panel_every_n_epochs``-th validation run
    (0: never), the first pair of the first validation batch is drawn with
    :func:`regnet.visualize.make_panel` (the overview ``overview.png`` of the inference commands,
    oriented with the batch's ``fixed_affine`` when it has one) into each TensorBoard logger as
    ``val/panel``.

    Args:
        model: registration network.
        loss: loss spec, e.g. ``"ncc+grad"``, ``"dice+grad"``, ``"ddf"``, see
            :func:`regnet.losses.build_loss`.
        loss_weights: weight per term name; terms not in ``loss`` are ignored, so one dict can
            list every registered term (missing ones take ``regnet.losses.DEFAULT_WEIGHTS``).
        loss_options: keyword arguments per term name, e.g. ``{"lncc": {"window": 7}}``.
        num_labels: ``K`` label values ``0 .. K-1`` of the data (0 if it has none).
        label_downsize: the label loss terms compare one-hot labels averaged over cells of
            ``f`` voxels per axis (soft label fractions), the moving ones warped by the field
            averaged over the same cells; ``1`` compares them at full resolution. Warping
            ``K`` one-hot channels and its backward pass dominate a step with many labels:
            ``voxelmorph`` with ``lncc+grad+dice``, 83 labels at 96x112x96, 2 CPU threads,
            takes 4.8 s per training step at ``f=1`` and 1.25 s at ``f=2``.
        optimizer: ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        weight_decay: optimiser weight decay.
        scheduler: ``"none"`` or ``"cosine"`` (cosine annealing over all training steps).
        val_panel_every_n_epochs: TensorBoard panel period in validation epochs (0: off).
        config: the resolved run configuration (plain dict); stored in the checkpoint's
            hyper-parameters so that :meth:`from_checkpoint` can rebuild ``model``
            (``config["model"]`` is its Hydra ``_target_`` spec).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str = "ncc+grad",
        loss_weights: Mapping[str, float] | None = None,
        loss_options: Mapping[str, Mapping[str, Any]] | None = None,
        num_labels: int = 0,
        label_downsize: int = 1,
        optimizer: str = "adam",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        scheduler: str = "none",
        val_panel_every_n_epochs: int = 1,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if val_panel_every_n_epochs < 0:
            raise ValueError(
                f"val_panel_every_n_epochs must be >= 0, got {val_panel_every_n_epochs}"
            )
        if num_labels < 0:
            raise ValueError(f"num_labels must be >= 0, got {num_labels}")
        if int(label_downsize) != label_downsize or label_downsize < 1:
            raise ValueError(f"label_downsize must be an integer >= 1, got {label_downsize}")
        # Lightning stores the arguments as they are: plain containers keep checkpoints
        # readable with weights_only=True (regnet.checkpoint)
        loss_weights, loss_options, config = map(
            plain_container, (loss_weights, loss_options, config)
        )
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        terms = parse_spec(loss)
        weights = {name: w for name, w in (loss_weights or {}).items() if name in terms}
        self.loss = build_loss(loss, weights=weights, options=loss_options)
        label_terms = set(self.loss.requires) & set(LABEL_INPUTS)
        if label_terms and num_labels < 2:
            raise ValueError(
                f"loss {loss!r} uses labels ({', '.join(sorted(label_terms))}) but num_labels "
                f"is {num_labels}; set it to the number of label values (>= 2)"
            )
        self._checked_stages: set[str] = set()
        self._validation_runs = 0  # validation runs of this fit so far (panel period)

    # ------------------------------------------------------------------ forward and loss
    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model outputs for ``fixed, moving (B, C, *S)``; ``"ddf"`` is ``(B, ndim, *S)``."""
        return self.model(fixed, moving)

    def _check_inputs(self, batch: Mapping[str, Any], stage: str) -> None:
        """Raise ``ValueError`` naming the loss terms whose inputs this stage's data lacks, or
        label values outside ``0 .. num_labels-1`` when the loss uses labels."""
        if stage in self._checked_stages:
            return
        try:
            self.loss.check(available_loss_inputs(batch))
        except ValueError as error:
            raise ValueError(
                f"{stage} data cannot feed loss {self.hparams.loss!r}: {error} "
                f"(the batch has keys {sorted(batch)}; label terms need fixed_label and "
                f"moving_label, the ddf term needs target_ddf)"
            ) from error
        if set(self.loss.requires) & set(LABEL_INPUTS):
            for key in ("fixed_label", "moving_label"):
                largest = int(batch[key].max())
                if largest >= self.hparams.num_labels:
                    raise ValueError(
                        f"{stage} data: {key} holds label {largest} but num_labels is "
                        f"{self.hparams.num_labels} (labels must lie in 0 .. num_labels-1)"
                    )
        self._checked_stages.add(stage)

    def _register(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the model and build the loss inputs (float32 after the network).

        Returns ``fixed``, ``moving``, ``warped``, ``ddf`` and those of ``fixed_label``,
        ``warped_label`` (when the loss needs them), ``target_ddf``, ``fixed_mask`` that apply.
        A batch with ``fixed_target`` and ``moving_target`` (images on the same grids as the
        network's inputs, e.g. the shared-contrast renders of
        :class:`~regnet.data.synth_brain.SynthBrainPairs`) gives the similarity terms those
        images as ``fixed`` and ``moving``/``warped``; the network still sees ``fixed`` and
        ``moving``.
        """
        fixed, moving = batch["fixed"], batch["moving"]
        outputs = self(fixed, moving)
        with torch.autocast(device_type=fixed.device.type, enabled=False):
            ddf = outputs["ddf"].float()
            if "fixed_target" in batch and "moving_target" in batch:
                fixed, moving = batch["fixed_target"], batch["moving_target"]
            fixed, moving = fixed.float(), moving.float()
            inputs = {"fixed": fixed, "moving": moving, "ddf": ddf, "warped": warp(moving, ddf)}
            if set(self.loss.requires) & set(LABEL_INPUTS):
                inputs.update(self._label_inputs(batch, ddf))
            for key in ("target_ddf", "fixed_mask"):
                if key in batch:
                    inputs[key] = batch[key].float()
        return inputs

    def _label_inputs(
        self, batch: Mapping[str, torch.Tensor], ddf: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One-hot ``fixed_label`` and linearly warped one-hot ``warped_label`` ``(B, K, *S')``.

        With ``label_downsize = f > 1`` each is averaged over cells of ``f`` voxels per axis
        (``S' = S // f``). Cell ``i`` is centred on full-resolution voxel ``f i + (f - 1) / 2``,
        an affine map of scale ``f``, so the cell-averaged field divided by ``f`` is the
        displacement in cell units (exact for fields linear over each cell).
        """
        k, f = self.hparams.num_labels, int(self.hparams.label_downsize)
        fixed_label = one_hot(batch["fixed_label"], k, cell=f)
        moving_label = one_hot(batch["moving_label"], k, cell=f)
        if f > 1:
            pool = F.avg_pool2d if ddf.dim() == 4 else F.avg_pool3d
            ddf = pool(ddf, f) / f
        return {"fixed_label": fixed_label, "warped_label": warp(moving_label, ddf)}

    def _loss(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        with torch.autocast(device_type=inputs["ddf"].device.type, enabled=False):
            return self.loss(inputs)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._check_inputs(batch, "train")
        inputs = self._register(batch)
        total, terms = self._loss(inputs)
        size = batch["fixed"].shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=size)
        self.log_dict(
            {f"train/loss_{name}": value for name, value in terms.items()}, batch_size=size
        )
        return total

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        inputs = self._evaluate(batch, "val")
        if batch_idx == 0 and self._panel_due():
            affine = batch["fixed_affine"][0] if "fixed_affine" in batch else None
            self._log_panel(inputs, affine)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    @torch.no_grad()
    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """Log loss terms and evaluation metrics of one batch; returns the loss inputs."""
        self._check_inputs(batch, stage)
        inputs = self._register(batch)
        total, terms = self._loss(inputs)
        fixed, warped, ddf = inputs["fixed"], inputs["warped"], inputs["ddf"]
        metrics = {"loss": total, **{f"loss_{name}": value for name, value in terms.items()}}
        metrics["mse"] = (warped - fixed).square().mean()
        metrics["ncc"] = global_ncc(warped, fixed).mean()
        metrics.update(pair_metrics(batch, ddf))
        self.log_dict(
            {f"{stage}/{name}": value for name, value in metrics.items()},
            prog_bar=False,
            batch_size=fixed.shape[0],
            sync_dist=True,
        )
        return inputs

    # ------------------------------------------------------------------ TensorBoard panel
    def _fitting_validation(self) -> bool:
        """True in a validation run of ``fit`` (not the sanity check, not ``validate``)."""
        return self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking

    def _panel_due(self) -> bool:
        every = self.hparams.val_panel_every_n_epochs
        return (
            every > 0
            and self._fitting_validation()
            and self._validation_runs % every == 0
            and self.global_rank == 0
        )

    def on_validation_epoch_end(self) -> None:
        if self._fitting_validation():
            self._validation_runs += 1

    def _log_panel(
        self, inputs: Mapping[str, torch.Tensor], affine: torch.Tensor | None = None
    ) -> None:
        """Draw the first pair with the fixed network grid's ``affine`` ``(4, 4)`` (``None``
        for data without one: array axes shown as R, A, S)."""
        writers = [lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers:
            return
        panel = make_panel(
            inputs["fixed"][0], inputs["moving"][0], inputs["warped"][0], inputs["ddf"][0], affine
        ).image
        for writer in writers:
            writer.add_image("val/panel", panel, self.global_step, dataformats="CHW")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        optimizer = OPTIMIZERS[self.hparams.optimizer](
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        if self.hparams.scheduler == "none":
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError(
                "scheduler='cosine' needs a finite training length: set trainer.max_steps or "
                "trainer.max_epochs"
            )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total_steps))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["regnet_version"] = __version__

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, map_location: str | torch.device | None = "cpu"
    ) -> RegistrationModule:
        """Rebuild a trained module from a checkpoint written by ``regnet-train``.

        The network is instantiated from ``hyper_parameters["config"]["model"]`` (a Hydra
        ``_target_`` spec with resolved values), then its weights are loaded. The file is read
        without running code from it (:func:`regnet.checkpoint.read_checkpoint`; a file that
        needs more raises :class:`regnet.data.io.DataError`).
        """
        checkpoint = read_checkpoint(path, map_location)
        config = checkpoint.get("hyper_parameters", {}).get("config")
        if not config or "model" not in config:
            raise ValueError(
                f"{path}: checkpoint holds no model config (hyper_parameters['config']['model']);"
                " it was not written by regnet-train"
            )
        model = instantiate(config["model"])
        return cls.load_from_checkpoint(
            path, map_location=map_location, model=model, weights_only=True
        )
