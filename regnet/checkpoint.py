"""Reading checkpoint files without running code stored in them.

A PyTorch checkpoint is a pickle, and unpickling can call any importable function the file
names: opening a checkpoint someone sent would run their code. regnet therefore reads every
checkpoint with ``torch.load(weights_only=True)``, which builds only tensors, plain containers
(``dict``, ``OrderedDict``, ``list``, ``tuple``, ``set``) and ``str``/``int``/``float``/``bool``/
``None``, and refuses any other object before creating it. Everything ``regnet-train`` writes is
of those types: the run configuration and loss settings are stored as plain containers (see
:class:`regnet.module.RegistrationModule`), and Lightning's own entries (loops, callbacks,
optimiser and scheduler states) are plain too, so no allow-list of extra classes is needed.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from regnet.data.io import DataError

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


def _is_pickle_or_zip(path: Path) -> bool:
    """True for a zip archive (``torch.save``) or a file opening with pickle's PROTO opcode."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    return start == b"PK\x03\x04" or start[:1] == b"\x80"


def read_checkpoint(
    path: str | Path, map_location: str | torch.device | None = "cpu"
) -> dict[str, Any]:
    """The contents of a checkpoint file, read with ``torch.load(weights_only=True)``.

    Raises:
        DataError: ``<path>: <problem>`` for a missing file, a file that is not a PyTorch
            checkpoint, or one that only arbitrary unpickling could read (refused before any of
            its objects is built; the message names the first function or class it asks for,
            or the pickle instruction the restricted reader stopped at).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error) or not _is_pickle_or_zip(path):
            raise DataError(f"{path}: not a PyTorch checkpoint (UnpicklingError)") from None
        found = _UNSUPPORTED_GLOBAL.search(str(error))
        if found:
            problem = f"reading it would run code stored in the file (it asks for {found[1]})"
        else:
            reason = _UNPICKLER_REASON.search(str(error))
            problem = "not readable without arbitrary unpickling" + (
                f" ({reason[1]})" if reason else ""
            )
        raise DataError(
            f"{path}: refused: {problem}; regnet reads only tensors and plain containers "
            "(torch.load weights_only=True)"
        ) from None
    except Exception as error:  # torch.load raises zip, runtime and EOF errors for other files
        raise DataError(f"{path}: not a PyTorch checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict):
        raise DataError(f"{path}: not a checkpoint (holds a {type(checkpoint).__name__})")
    return checkpoint


def plain_container(value: Any) -> Any:
    """``value`` with every mapping turned into a ``dict`` and every list or tuple (also
    OmegaConf's, interpolations resolved) into a ``list``, so that a checkpoint storing it loads
    with ``weights_only=True``; other values are returned as they are."""
    if isinstance(value, Mapping):
        return {key: plain_container(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain_container(item) for item in value]
    return value
