"""A tiny registration network trained in seconds, for command-line tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from regnet.cli.config import config_dir
from regnet.cli.train import train


def train_tiny_checkpoint(folder: Path, experiment: str = "debug3d") -> Path:
    """Train a small VoxelMorph for two steps on synthetic data (``experiment=debug3d``: 3D,
    16^3; ``debug``: 2D, 32^2) into ``folder``; returns its ``last.ckpt``."""
    overrides = [
        f"experiment={experiment}",
        f"paths.output_dir={folder}",
        "trainer.max_steps=2",
        "data.train.length=2",
        "data.val.length=1",
        "model.enc_channels=[4,8]",
        "model.dec_channels=[8,8,8,4]",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        train(compose("train", overrides=overrides))
    return folder / "checkpoints" / "last.ckpt"
