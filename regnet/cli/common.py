"""What every inference command-line tool shares: config composition, devices and bad input.

Bad input (a missing or unreadable file, a 4D volume, NaN voxels, an incompatible checkpoint, an
output folder that already holds results ...) is raised as :class:`InputError` anywhere below the
entry point; :func:`run_command` turns it, :class:`regnet.data.io.DataError` (bad files, from the
data layer and :mod:`regnet.pipeline`) and :class:`regnet.outputs.OutputExistsError` into one line

    error: <file or argument>: <problem>

on stderr and exit status :data:`EXIT_BAD_INPUT`, without a traceback. Every other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from regnet.cli.config import config_dir
from regnet.data.io import IMAGE_SUFFIXES, DataError, read_pair_list
from regnet.outputs import OutputExistsError
from regnet.pipeline import PairInputs, load_pair_inputs

EXIT_BAD_INPUT = 2
"""Exit status for bad input (files, arguments, existing outputs)."""


class InputError(Exception):
    """A problem with one input the user gave: ``subject`` (a file or an argument) and
    ``problem`` (what is wrong with it), printed as ``error: <subject>: <problem>``."""

    def __init__(self, subject: object, problem: str) -> None:
        self.subject = str(subject)
        self.problem = problem
        super().__init__(f"{self.subject}: {problem}")


def run_command(task: Callable[[], object]) -> None:
    """Run ``task``; on :class:`InputError`, ``DataError`` or ``OutputExistsError`` print
    ``error: <message>`` (first line) to stderr and exit with :data:`EXIT_BAD_INPUT`."""
    try:
        task()
    except (InputError, DataError, OutputExistsError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def run_pair_command(
    name: str, run: Callable[[DictConfig], object], argv: Sequence[str] | None
) -> None:
    """The console entry of ``register.py`` / ``predict.py``: compose ``configs/<name>.yaml``
    with ``argv`` (the command line's arguments when ``None``) and ``run`` it under
    :func:`run_command`. From the command line the process first keeps freed memory for reuse
    (:func:`reuse_freed_memory`), and a run without ``pairs=`` ends it at once when done
    (:func:`end_process`)."""
    if argv is None:
        reuse_freed_memory()
    overrides = list(sys.argv[1:] if argv is None else argv)
    composed: list[DictConfig] = []

    def task() -> None:
        composed.append(compose_config(name, overrides))
        run(composed[0])

    run_command(task)
    if argv is None and composed[0].pairs is None:
        end_process()


MALLOPT_TRIM_THRESHOLD, MALLOPT_MMAP_MAX = -1, -4
"""glibc's ``mallopt`` parameters ``M_TRIM_THRESHOLD`` and ``M_MMAP_MAX`` (``malloc.h``)."""


def reuse_freed_memory() -> bool:
    """Have glibc's ``malloc`` keep the memory of freed tensors for the next ones; ``False``
    where the C library is not glibc (nothing changes there).

    By default glibc gives every block above 32 MB its own ``mmap`` and unmaps it when freed, so
    each such tensor of every iteration (a 3-component field on a 1.25 mm brain grid is 44 MB)
    arrives as fresh pages that the kernel faults in and zeroes: ``register.py`` between Colin27
    and the ICBM template on that grid (2 CPU threads) spent 20 s of system time and took 33.7 s
    to register, against 5 s and 27.4 s with ``M_MMAP_MAX`` 0 (blocks from the heap, reused)
    and ``M_TRIM_THRESHOLD`` at its largest (freed memory kept), for 2.9 GB of peak resident
    memory instead of 2.1 GB. PyTorch's CPU performance guide recommends a caching allocator
    (jemalloc, TCMalloc) for the same reason; this is glibc's own setting for it."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    kept = mallopt(MALLOPT_TRIM_THRESHOLD, 2**31 - 1)
    return bool(mallopt(MALLOPT_MMAP_MAX, 0)) and bool(kept)


def end_process() -> NoReturn:
    """End a finished single-pair command at once, skipping the interpreter's teardown.

    After ``import torch`` the teardown takes about half a second (2 threads: ``python -c
    "import torch"`` 1.77 s, 1.23 s when it ends with ``os._exit(0)``), a tenth of registering
    a 2 mm brain pair. By then every output is written, closed and moved into place, and the
    writer threads have been joined; only the console streams need flushing. Lists of pairs
    (Lightning, possibly several processes) end normally."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def compose_config(name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose ``configs/<name>.yaml`` with Hydra command-line ``overrides`` (``key=value``).

    Hydra's compose API is used instead of ``@hydra.main`` so that an inference run writes
    nothing but its results (no run folder, no log file). The config is resolved.

    Raises:
        InputError: naming the command line when an override cannot be parsed or applied.
    """
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name=name, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        problem = " ".join(str(error).split())
        raise InputError(
            f"command line {' '.join(overrides) or '(no arguments)'}", problem
        ) from None
    return cfg


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        InputError: for an unknown name or CUDA requested on a machine without it.
    """
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"device={name}", "expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device={name}", "expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={name}", "CUDA is not available on this machine")
    return device


def as_pair(value: object, argument: str) -> tuple[str, str] | None:
    """A two-element list argument (``pair=[a,b]``) as a tuple of strings; ``None`` stays None.

    Raises:
        InputError: naming ``argument`` when the value is not a list of exactly two paths.
    """
    if value is None:
        return None
    items = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if not isinstance(items, (list, tuple)) or len(items) != 2 or None in items:
        raise InputError(argument, f"expected [fixed,moving], got {items!r}")
    return str(items[0]), str(items[1])


@dataclass(frozen=True)
class PairSpec:
    """One pair to register: image files, optional ``(fixed, moving)`` label maps and landmarks
    (CSV files or ``(N, 3)`` RAS mm arrays), and ``name``, its output subfolder."""

    name: str
    fixed: Path
    moving: Path
    labels: tuple[Path, Path] | None = None
    landmarks: tuple[Path | np.ndarray, Path | np.ndarray] | None = None

    def load(self) -> PairInputs:
        """Read and check the files (:func:`regnet.pipeline.load_pair_inputs`)."""
        return load_pair_inputs(self.fixed, self.moving, self.labels, self.landmarks)

    def check_files(self) -> None:
        """Cheap check before any work: every file named exists, images may be DICOM series
        folders (``DataError`` otherwise)."""
        for path in [self.fixed, self.moving, *(self.labels or ())]:
            if not path.is_file() and not path.is_dir():
                raise DataError(f"{path}: file not found")
        for path in [p for p in self.landmarks or () if isinstance(p, Path)]:
            if not path.is_file():
                raise DataError(f"{path}: file not found")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def pair_name(index: int, fixed: Path, moving: Path) -> str:
    """Output subfolder of pair ``index`` (from 1): ``001_<moving>_to_<fixed>``."""
    return f"{index:03d}_{_stem(moving)}_to_{_stem(fixed)}"


def pairs_from_list(path: str | Path) -> list[PairSpec]:
    """Pairs from a CSV (header row) or JSON list: columns ``fixed``, ``moving`` and optional
    ``fixed_label``, ``moving_label``, ``fixed_landmarks``, ``moving_landmarks`` (as for
    :class:`regnet.data.layouts.PairListDataset`); relative paths are taken from the list's folder.

    Raises:
        DataError: ``<list> row <n>: ...`` for a row without ``fixed``/``moving`` or with only
            one of a fixed/moving column pair; an empty list.
    """
    path = Path(path)
    base = path.parent
    specs = []
    for number, row in enumerate(read_pair_list(path), start=1):
        where = f"{path} row {number}"
        for column in ("fixed", "moving"):
            if column not in row:
                raise DataError(f"{where}: column '{column}' is missing or empty")
        extras = {}
        for field in ("label", "landmarks"):
            present = [f"{role}_{field}" in row for role in ("fixed", "moving")]
            if any(present) and not all(present):
                raise DataError(f"{where}: needs both fixed_{field} and moving_{field}, or neither")
            if all(present):
                extras[field] = tuple(base / row[f"{role}_{field}"] for role in ("fixed", "moving"))
        fixed, moving = base / row["fixed"], base / row["moving"]
        specs.append(
            PairSpec(
                pair_name(number, fixed, moving),
                fixed,
                moving,
                extras.get("label"),
                extras.get("landmarks"),
            )
        )
    if not specs:
        raise DataError(f"{path}: pair list has no rows")
    return specs


def summary_line(metrics: dict) -> str:
    """One human-readable line of the main metrics."""
    parts = []
    if metrics.get("dice_mean") is not None:
        parts.append(f"Dice {metrics['dice_mean']:.3f}")
    if metrics.get("hd95_mean") is not None:
        parts.append(f"HD95 {metrics['hd95_mean']:.2f} mm")
    if "tre_mm" in metrics:
        parts.append(f"TRE {metrics['tre_mm']['mean']:.2f} mm")
    parts.append(f"folding {metrics['folding_percent']:.3f} %")
    parts.append(f"SDlogJ {metrics['sdlogj']:.3f}")
    parts.append(f"{metrics['seconds']:.2f} s")
    return ", ".join(parts)
