"""``regnet-train``: train a registration network from the Hydra configs in ``configs/``.

Examples::

    regnet-train                                   # synthetic 2D data, VoxelMorph, ncc+grad
    regnet-train experiment=debug                  # a few steps on tiny data
    regnet-train model=bspline loss=lncc+bending+dice loss_weights.dice=2
    regnet-train trainer=gpu data=synthetic3d ckpt_path=outputs/train/<run>/checkpoints/last.ckpt

Each run writes into one directory (``paths.output_dir``, by default
``outputs/<task_name>/<date>_<time>``): ``config.yaml`` (the resolved configuration; Hydra's
``.hydra/`` keeps the unresolved one and the overrides), ``checkpoints/`` and ``tensorboard/``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from regnet.checkpoint import read_checkpoint
from regnet.cli.common import EXIT_BAD_INPUT
from regnet.cli.config import config_dir
from regnet.data.io import DataError
from regnet.module import RegistrationModule

log = logging.getLogger(__name__)


def checkpoint_monitor(num_labels: int) -> tuple[str, str]:
    """Metric and mode that pick the best checkpoint: Dice with labels, else the loss."""
    return ("val/dice", "max") if num_labels > 0 else ("val/loss", "min")


def _resolve_auto_monitor(cfg: DictConfig) -> None:
    """Set callbacks' ``monitor: auto`` / ``mode: auto`` from :func:`checkpoint_monitor`."""
    metric, mode = checkpoint_monitor(int(cfg.data.get("num_labels", 0)))
    with open_dict(cfg):
        for callback in (cfg.get("callbacks") or {}).values():
            if callback.get("monitor") == "auto":
                callback.monitor = metric
            if callback.get("mode") == "auto":
                callback.mode = mode


def _instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a config group (callbacks, loggers)."""
    return [instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def build_module(cfg: DictConfig) -> RegistrationModule:
    """The :class:`RegistrationModule` described by ``cfg`` (model, loss, optimiser)."""
    model = instantiate(cfg.model, _convert_="all")
    return RegistrationModule(
        model=model,
        loss=cfg.loss,
        loss_weights=OmegaConf.to_container(cfg.loss_weights, resolve=True),
        loss_options=OmegaConf.to_container(cfg.loss_options, resolve=True),
        num_labels=int(cfg.data.get("num_labels", 0)),
        label_downsize=int(cfg.get("label_downsize", 1)),
        optimizer=cfg.optimizer.name,
        lr=cfg.optimizer.lr,
        weight_decay=cfg.optimizer.weight_decay,
        scheduler=cfg.optimizer.scheduler,
        val_panel_every_n_epochs=cfg.val_panel_every_n_epochs,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def load_network_weights(
    module: RegistrationModule, checkpoint: Mapping[str, Any], path: str | Path
) -> None:
    """Copy the network weights of ``checkpoint`` (read from ``path``) into ``module``.

    Raises:
        DataError: the checkpoint has no weights, or they do not fit the configured model.
    """
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise DataError(f"{path}: init_weights: not a regnet-train checkpoint (no state_dict)")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    resized = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or resized:
        first = (missing or unexpected or resized)[0]
        raise DataError(
            f"{path}: init_weights do not fit the configured model ({len(missing)} weights "
            f"missing, {len(unexpected)} unexpected, {len(resized)} of another shape; first: "
            f"{first})"
        )
    module.load_state_dict(state, strict=True)


def train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> L.Trainer:
    """Fit, then validate (and test, if the datamodule has a ``test`` set) the best checkpoint.

    Args:
        cfg: composed ``train`` config (without the ``hydra`` node).
        callbacks: extra Lightning callbacks, added to those of ``cfg.callbacks``.

    Every checkpoint (``ckpt_path`` to resume from, ``init_weights`` to start from, the best
    one) is read with ``weights_only=True`` (:mod:`regnet.checkpoint`), and checked before
    anything is written.

    Returns:
        The trainer after the last stage; ``trainer.callback_metrics`` holds the final metrics.

    Raises:
        DataError: ``ckpt_path`` is missing, not a checkpoint, or needs arbitrary unpickling.
    """
    if cfg.get("ckpt_path"):
        read_checkpoint(cfg.ckpt_path)
    if cfg.get("ckpt_path") and cfg.get("init_weights"):
        raise DataError(
            "give ckpt_path (resume a run) or init_weights (start a run from weights), not both"
        )
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    _resolve_auto_monitor(cfg)
    module = build_module(cfg)
    if cfg.get("init_weights"):
        load_network_weights(module, read_checkpoint(cfg.init_weights), cfg.init_weights)
    output_dir = Path(cfg.paths.output_dir)
    if rank_zero_only.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=[*_instantiate_all(cfg.get("callbacks")), *callbacks],
        logger=_instantiate_all(cfg.get("logger")) or False,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:
        log.info("Best checkpoint: %s", best)
        trainer.validate(module, datamodule=datamodule, ckpt_path=best, weights_only=True)
        if getattr(datamodule, "test", None) is not None:
            trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True)
    if trainer.is_global_zero:
        print(f"Run directory: {output_dir}")
    return trainer


def _hydra_task(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except DataError as error:  # bad input: one line, as the inference commands print it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def main() -> None:
    """Console entry point: ``regnet-train [hydra overrides]``."""
    hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(
        _hydra_task
    )()


if __name__ == "__main__":
    main()
