"""Networks shipped inside the package, loaded by name: ``predict.py ckpt=brain``.

A bundled checkpoint is a regnet-train checkpoint stripped to what prediction reads (the
``model.*`` weights, the resolved training config, the regnet version, the training step) and
stored under ``regnet/weights/``. :func:`resolve_checkpoint` turns a name into that file; a path
to a file always wins over a name. How each model is trained and how it measures:
docs/benchmarks.md, "Training the brain network" (no weights are bundled yet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from regnet.checkpoint import plain_container, read_checkpoint
from regnet.data.io import DataError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

BUNDLED_MODELS = {
    "brain": "brain_2mm.ckpt",
}
"""Name -> file in :data:`WEIGHTS_DIR`. ``brain``: contrast-agnostic diffeomorphic U-Net for
brain MRI at 2 mm (``experiment=synth_brain_2mm``), run after ``register.py``'s affine start."""


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """The checkpoint file for ``ckpt=``: an existing path as it is, else a bundled model's
    file when ``name_or_path`` is one of :data:`BUNDLED_MODELS`, else the path (whose absence
    the loader reports)."""
    path = Path(name_or_path)
    name = str(name_or_path)
    if not path.exists() and name in BUNDLED_MODELS:
        return WEIGHTS_DIR / BUNDLED_MODELS[name]
    return path


def bundle_checkpoint(
    source: str | Path, target: str | Path, settings: dict[str, Any] | None = None
) -> Path:
    """Write ``source`` (a regnet-train checkpoint) to ``target`` stripped for prediction.

    ``settings`` are merged into the stored training config, section by section (e.g.
    ``{"predict": {"affine_start": True}}``, read by ``predict.py affine_start=auto``).

    Raises:
        DataError: ``<source>: <problem>`` when it is not a regnet-train checkpoint.
    """
    checkpoint = read_checkpoint(source)
    config = (checkpoint.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, dict) or "model" not in config or "regnet_version" not in checkpoint:
        raise DataError(f"{source}: not a regnet-train checkpoint")
    config = plain_container(config)
    for section, values in (settings or {}).items():
        config[section] = {**(config.get(section) or {}), **values}
    weights = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    stripped = {
        "state_dict": weights,
        "hyper_parameters": {"config": config},
        "regnet_version": checkpoint["regnet_version"],
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
    }
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    torch.save(stripped, partial)
    partial.replace(target)
    return target
