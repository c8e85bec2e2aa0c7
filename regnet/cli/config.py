"""Where the Hydra configuration tree (``configs/``) lives, shared by every command-line tool."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR_ENV = "REGNET_CONFIG_DIR"
"""Environment variable that, when set, names the configs directory to use instead."""


def config_dir() -> Path:
    """Absolute path of the configs directory.

    ``$REGNET_CONFIG_DIR`` when set, else ``configs/`` next to the ``regnet`` package in the
    source tree. Raises ``FileNotFoundError`` if the chosen directory has no ``train.yaml``.
    """
    override = os.environ.get(CONFIG_DIR_ENV)
    if override:
        path, source = Path(override).expanduser().resolve(), f"${CONFIG_DIR_ENV}"
    else:
        path, source = Path(__file__).resolve().parents[2] / "configs", "the source tree"
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(
            f"configs directory {path} (from {source}) has no train.yaml; "
            f"set {CONFIG_DIR_ENV} to the regnet configs directory"
        )
    return path
