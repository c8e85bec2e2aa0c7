"""Many pairs, many processes: Lightning's prediction loop over a list of pairs, resumable.

``predict.py pairs=``/``learn2reg=``, ``register.py pairs=`` and ``evaluate.py`` describe their
work as a :class:`Cohort` (the pairs, the method names, how to run one method on one pair and how
to write its result) and hand it to :func:`run_cohort`.

Conventions:

* Unit of work: one (pair, method). A pair is read once (:meth:`PairSpec.load`, in the
  DataLoader's ``num_workers`` worker processes) and every method still to do runs on it in
  :meth:`CohortRunner.predict_step`, on the rank's device.
* Ranks: ``devices`` processes on each of ``num_nodes`` machines, started and connected by
  Lightning's ``Trainer`` (its own launcher, or torchrun / SLURM, whose environment Lightning
  reads; DDP on CPU uses gloo). Rank ``r`` of ``W`` takes the pending pairs ``r, r + W, ...``
  (:class:`RankSampler`): disjoint, none padded or repeated.
* Manifest: ``<out>/manifest/rank<r>.jsonl``, appended only by global rank ``r``, one JSON object
  per line, each line one ``write``: ``pair``, ``method``, ``config`` (:func:`unit_config`: a hash
  of the settings that change results, the method, its checkpoint's size and time, the pair's
  files), ``status`` (``done`` | ``failed``), ``row`` (the CSV row, :func:`result_row`),
  ``metrics`` (every metric), ``error`` and ``bad_input`` (failures), ``rank``, ``finished``
  (Unix time) and ``peak_memory_mb`` (:func:`peak_memory_mb`). The latest line of a
  (pair, method) holds. A unit whose latest line is ``done`` with the current ``config`` is
  skipped; every other one runs (all of them with ``redo``, i.e. ``overwrite=true``). Every rank
  reads the manifest before it joins the others, so before any rank writes: all agree on the
  pending pairs.
* Outputs: a unit's files are written by the rank that computed it, staged (complete or absent,
  :func:`regnet.outputs.staged_output`), before its manifest line. An ``out`` that holds files but
  no manifest is refused unless ``overwrite`` (:func:`check_cohort_out`).
* Failures: an exception while loading or registering a pair is recorded (``failed``, one-line
  error) and the other pairs go on. With ``fail_fast`` no pair starts after the first failure of
  any rank (ranks read the manifest before each pair) and the run ends with that error: the
  file's one line and exit status 2 for bad input, :class:`CohortError` otherwise.
* Rank 0 merges the manifest once every rank has finished (a barrier) into a
  :class:`CohortReport`: the rows of every (pair, method) in list order, the failures and the
  throughput of the run (other ranks get ``None``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import resource
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from regnet.cli.common import InputError, PairSpec, resolve_device
from regnet.data.io import DataError
from regnet.outputs import OutputExistsError, check_output_dir, json_ready, write_registration
from regnet.pipeline import PairInputs, RegistrationResult

MANIFEST = "manifest"
"""Folder of the manifest files in ``out``."""

COLUMNS = ("dice_mean", "hd95_mean", "tre_mean_mm", "folding_percent", "sdlogj", "seconds")
"""Per-pair metrics of the CSV rows and the summaries, in this order."""

RUN_SETTINGS = (
    "out",
    "device",
    "devices",
    "num_nodes",
    "strategy",
    "num_workers",
    "overwrite",
    "fail_fast",
    "pair",
    "pairs",
    "learn2reg",
    "split",
    "submission",
    "learn2reg_config",
    "methods",
)
"""Settings that say where, how or which pairs run, not what a result is: left out of the
``config`` hash (the pair's files and the method are hashed per unit instead)."""

BAD_INPUT = (InputError, DataError, OutputExistsError)
"""Errors that are the input's fault: reported in one line, without a traceback."""


class CohortError(RuntimeError):
    """A pair failed with an unexpected error and ``fail_fast`` stopped the run."""


def result_row(method: str, spec: PairSpec, metrics: dict | None, error: str = "") -> dict:
    """A CSV row: method, pair, files, :data:`COLUMNS` (``None`` when absent) and ``error``."""
    metrics = metrics or {}
    tre = metrics.get("tre_mm") or {}
    values = dict(metrics, tre_mean_mm=tre.get("mean"))
    row = {"method": method, "pair": spec.name, "fixed": str(spec.fixed)}
    row["moving"] = str(spec.moving)
    row.update({column: values.get(column) for column in COLUMNS})
    row["error"] = error
    return row


def rows_csv(rows: Sequence[dict]) -> str:
    """Rows as CSV text, with a header of the first row's keys."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it onto ``path``: readers see the old
    file or the new one, never a part."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def settings_of(cfg: DictConfig) -> dict:
    """The resolved settings that change results: ``cfg`` without :data:`RUN_SETTINGS`."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    return {key: value for key, value in settings.items() if key not in RUN_SETTINGS}


def unit_config(settings: dict, method: str, spec: PairSpec) -> str:
    """Hash (16 hex digits) of what makes a unit's result: ``settings``, ``method`` (with the
    size and modification time of a ``ckpt:PATH`` file) and the pair's files (or landmark
    arrays)."""
    files: list[Any] = [str(spec.fixed), str(spec.moving), *map(str, spec.labels or ())]
    for points in spec.landmarks or ():
        files.append(np.asarray(points).tolist() if not isinstance(points, Path) else str(points))
    kind, _, path = method.partition(":")
    stamp = None
    if kind == "ckpt" and Path(path).is_file():
        stat = Path(path).stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
    text = json.dumps([settings, method, stamp, files], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far, MiB: ``torch.cuda.max_memory_allocated`` on a GPU,
    the maximum resident set size (``getrusage``, KiB on Linux) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Manifest:
    """The manifest of an output folder (see the module docstring)."""

    def __init__(self, out: Path) -> None:
        self.folder = out / MANIFEST

    def exists(self) -> bool:
        """Whether some process has recorded a unit in this folder."""
        return self.folder.is_dir()

    def lines(self) -> dict[Path, list[dict]]:
        """Every complete line of every rank's file, in file order (a last line without its
        newline, left by a process that died while writing, is not complete)."""
        found = {}
        for path in sorted(self.folder.glob("rank*.jsonl")):
            records = []
            for line in path.read_text().split("\n")[:-1]:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            found[path] = records
        return found

    def snapshot(self) -> dict[Path, int]:
        """Number of lines per file now; :meth:`since` returns the lines written after it."""
        return {path: len(records) for path, records in self.lines().items()}

    def since(self, snapshot: dict[Path, int]) -> list[dict]:
        """The lines written after ``snapshot`` was taken, every rank's."""
        return [
            record
            for path, records in self.lines().items()
            for record in records[snapshot.get(path, 0) :]
        ]

    def latest(self) -> dict[tuple[str, str], dict]:
        """The latest line of every (pair, method)."""
        records = [record for lines in self.lines().values() for record in lines]
        return {(r["pair"], r["method"]): r for r in sorted(records, key=lambda r: r["finished"])}

    def append(self, rank: int, record: dict) -> None:
        """Append ``record`` as one line of rank ``rank``'s file, with one ``write``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(json_ready(record), allow_nan=False) + "\n").encode()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        handle = os.open(self.folder / f"rank{rank}.jsonl", flags, 0o644)
        try:
            os.write(handle, line)
        finally:
            os.close(handle)


def check_cohort_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that holds files but no manifest (results of something else), unless
    ``overwrite`` (:class:`regnet.outputs.OutputExistsError`)."""
    if not Manifest(out).exists():
        check_output_dir(out, overwrite)


@dataclass(frozen=True)
class Cohort:
    """Pairs to register with each of ``methods``, results under ``out``.

    ``run(method, inputs, device)`` registers one pair on ``device`` (the rank's);
    ``write(method, spec, inputs, result)`` writes its outputs (staged) and returns the line to
    print; ``settings`` (:func:`settings_of`) go into every unit's ``config`` hash.
    """

    specs: Sequence[PairSpec]
    methods: Sequence[str]
    out: Path
    settings: dict
    run: Callable[[str, PairInputs, torch.device], RegistrationResult]
    write: Callable[[str, PairSpec, PairInputs, RegistrationResult], str]


@dataclass(frozen=True)
class Job:
    """A pair and the methods still to run on it."""

    spec: PairSpec
    methods: tuple[str, ...]


@dataclass(frozen=True)
class Failure:
    """What went wrong: ``message`` (one line), ``bad_input`` (an :class:`InputError`,
    ``DataError`` or ``OutputExistsError``: no traceback) and the traceback otherwise."""

    message: str
    bad_input: bool
    trace: str = ""

    @classmethod
    def current(cls, error: Exception) -> Failure:
        """The failure of ``error``, inside its ``except`` block."""
        text = str(error).strip()
        first = text.splitlines()[0] if text else repr(error)
        if isinstance(error, BAD_INPUT):
            return cls(first, True)
        return cls(f"{type(error).__name__}: {first}", False, traceback.format_exc())


@dataclass(frozen=True)
class LoadedJob:
    """A job with its pair read (``inputs``) or the ``failure`` of reading it."""

    job: Job
    inputs: PairInputs | None
    failure: Failure | None


class PairDataset(Dataset):
    """Jobs whose items are their pairs, checked and read (:meth:`PairSpec.load`); a pair that
    cannot be read is an item too, carrying its :class:`Failure`."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self.jobs = list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> LoadedJob:
        job = self.jobs[index]
        try:
            job.spec.check_files()
            return LoadedJob(job, job.spec.load(), None)
        except Exception as error:
            return LoadedJob(job, None, Failure.current(error))


def _as_loaded(item: LoadedJob) -> LoadedJob:
    """The DataLoader's ``collate_fn``: items are used as they are (no batching)."""
    return item


class RankSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` below ``length``: each rank its own items, none added
    to even out the ranks (Lightning's default ``DistributedSampler`` pads with repeats). Stops
    early once ``stopped()`` is true."""

    def __init__(self, length: int, rank: int, world: int, stopped: Callable[[], bool]) -> None:
        self.indices = range(rank, length, world)
        self.stopped = stopped

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        for index in self.indices:
            if self.stopped():
                return
            yield index


@dataclass(frozen=True)
class CohortReport:
    """Rank 0's view of a finished run: ``records`` (the latest manifest line of every
    (pair, method) of the list, in list order), ``failures`` (those that failed), how many pairs
    were registered by this run (``computed``), were done before (``skipped``), on how many
    ``processes``, in ``seconds`` (rank 0, from its first pair to the last rank's end),
    ``peak_memory_mb`` (the largest of the ranks) and the memory measure (``memory``)."""

    records: list[dict]
    failures: list[dict]
    computed: int
    skipped: int
    processes: int
    seconds: float
    peak_memory_mb: float
    memory: str

    @property
    def rows(self) -> list[dict]:
        return [record["row"] for record in self.records]

    def throughput(self) -> str:
        """One line: pairs registered, per minute, seconds per pair, skipped, failed, memory."""
        per_minute = 60.0 * self.computed / self.seconds if self.seconds > 0 else 0.0
        per_pair = self.seconds / self.computed if self.computed else 0.0
        return (
            f"{self.computed} pairs run in {self.seconds:.1f} s on {self.processes} process(es): "
            f"{per_minute:.2f} pairs/min, {per_pair:.2f} s per pair; {self.skipped} done before "
            f"(skipped), {len(self.failures)} failed; peak memory {self.peak_memory_mb:.0f} MiB "
            f"per process ({self.memory})"
        )

    def conclude(self, summary: Path) -> None:
        """Print the throughput line; raise :class:`InputError` naming ``summary`` (where the
        failures are listed) when a pair failed."""
        print(self.throughput(), flush=True)
        if self.failures:
            first = self.failures[0]
            raise InputError(
                summary,
                f"{len(self.failures)} of {len(self.records)} results failed (listed there); "
                f"first: {first['pair']} {first['method']}: {first['error']}",
            )


def _say(stream, text: str) -> None:
    """One line in one ``write``, so that lines of ranks sharing a terminal do not interleave."""
    stream.write(text + "\n")
    stream.flush()


class CohortProgressBar(TQDMProgressBar):
    """Lightning's progress bar on rank 0, over the pending pairs of every rank: it counts the
    pairs with a manifest line written since the run started."""

    def __init__(self, runner: CohortRunner) -> None:
        super().__init__()
        self.runner = runner

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self.predict_progress_bar.total = len(self.runner.jobs)
        self.predict_progress_bar.set_description("pairs")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        bar = self.predict_progress_bar
        if not bar.disable:
            bar.n = len({r["pair"] for r in self.runner.manifest.since(self.runner.snapshot)})
            bar.refresh()


class CohortRunner(LightningModule):
    """The per-pair loop as a LightningModule: ``predict_step`` runs the pending methods of one
    pair, writes the outputs and appends the manifest lines; rank 0 builds the
    :class:`CohortReport` in ``on_predict_end``."""

    def __init__(
        self,
        cohort: Cohort,
        jobs: Sequence[Job],
        snapshot: dict[Path, int],
        num_workers: int,
        fail_fast: bool,
    ) -> None:
        super().__init__()
        self.cohort, self.jobs, self.snapshot = cohort, list(jobs), snapshot
        self.manifest = Manifest(cohort.out)
        self.num_workers, self.fail_fast = num_workers, fail_fast
        self.stopped = False
        self.started = time.perf_counter()
        self.report: CohortReport | None = None

    def predict_dataloader(self) -> DataLoader:
        sampler = RankSampler(
            len(self.jobs), self.global_rank, self.trainer.world_size, lambda: self.stopped
        )
        return DataLoader(
            PairDataset(self.jobs),
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_as_loaded,
        )

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # the per-pair functions move what they need; inputs stay on the CPU

    def on_predict_start(self) -> None:
        self.started = time.perf_counter()

    def predict_step(self, loaded: LoadedJob, batch_idx: int) -> None:
        if self.fail_fast and not self.stopped:
            self.stopped = any(r["status"] == "failed" for r in self.manifest.since(self.snapshot))
        if self.stopped:
            return
        spec = loaded.job.spec
        for method in loaded.job.methods:
            result, line, failure = None, "", loaded.failure
            if failure is None:
                try:
                    with torch.enable_grad():  # optimisation needs it; Lightning predicts without
                        result = self.cohort.run(method, loaded.inputs, self.device)
                    line = self.cohort.write(method, spec, loaded.inputs, result)
                except Exception as error:
                    failure = Failure.current(error)
            self._record(spec, method, result, failure)
            if failure is None:
                _say(sys.stdout, line)
                continue
            if failure.trace:
                _say(sys.stderr, failure.trace.rstrip("\n"))
            if self.fail_fast:
                self.stopped = True
                return
            _say(sys.stderr, f"failed: {spec.name} {method}: {failure.message}")

    def _record(self, spec, method, result, failure) -> None:
        metrics = None if result is None else result.metrics
        record = {
            "pair": spec.name,
            "method": method,
            "config": unit_config(self.cohort.settings, method, spec),
            "status": "done" if failure is None else "failed",
            "row": result_row(method, spec, metrics, "" if failure is None else failure.message),
            "metrics": metrics,
            "rank": self.global_rank,
            "finished": time.time(),
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        if failure is not None:
            record.update(error=failure.message, bad_input=failure.bad_input)
        self.manifest.append(self.global_rank, record)

    def on_predict_end(self) -> None:
        self.trainer.strategy.barrier("cohort_end")
        if self.trainer.is_global_zero:
            self.report = merge(
                self.cohort,
                self.snapshot,
                skipped=len(self.cohort.specs) - len(self.jobs),
                processes=self.trainer.world_size,
                seconds=time.perf_counter() - self.started,
                device=self.device,
            )


def pending_jobs(cohort: Cohort, redo: bool) -> list[Job]:
    """The pairs with a method still to do (every method with ``redo``): a unit is done when its
    latest manifest line is ``done`` with the current ``config``."""
    done = {} if redo else Manifest(cohort.out).latest()
    jobs = []
    for spec in cohort.specs:
        methods = []
        for method in cohort.methods:
            record = done.get((spec.name, method))
            config = unit_config(cohort.settings, method, spec)
            if not (record and record["status"] == "done" and record["config"] == config):
                methods.append(method)
        if methods:
            jobs.append(Job(spec, tuple(methods)))
    return jobs


def merge(
    cohort: Cohort,
    snapshot: dict[Path, int],
    skipped: int,
    processes: int,
    seconds: float,
    device: torch.device,
) -> CohortReport:
    """Rank 0's :class:`CohortReport` from the manifest once every rank has finished
    (``snapshot``: its line counts when the run started)."""
    manifest = Manifest(cohort.out)
    latest = manifest.latest()
    records = [
        latest[(spec.name, method)]
        for spec in cohort.specs
        for method in cohort.methods
        if (spec.name, method) in latest
    ]
    new = manifest.since(snapshot)
    memory = [r["peak_memory_mb"] for r in new] or [peak_memory_mb(device)]
    return CohortReport(
        records=records,
        failures=[r for r in records if r["status"] == "failed"],
        computed=len({r["pair"] for r in new}),
        skipped=skipped,
        processes=processes,
        seconds=seconds,
        peak_memory_mb=max(memory),
        memory="GPU max allocated" if device.type == "cuda" else "max RSS",
    )


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Leave Lightning's start-up lines (devices found, process group registered) and its hints
    about DataLoader workers and empty predictions out of the command's output."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*predict returned None.*")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def build_trainer(cfg: DictConfig, progress: TQDMProgressBar | None) -> Trainer:
    """A Trainer for ``device`` (``auto`` / ``cpu`` / ``cuda[:N]``), ``devices``, ``num_nodes``
    and ``strategy``; no logger, no checkpoints, samplers left as given.

    Raises:
        InputError: naming the settings Lightning refuses.
    """
    device = resolve_device(cfg.device)
    devices = cfg.devices
    devices = OmegaConf.to_container(devices) if OmegaConf.is_config(devices) else devices
    if device.index is not None and devices == 1:
        devices = [device.index]
    subject = f"device={cfg.device} devices={cfg.devices} num_nodes={cfg.num_nodes}"
    try:
        return Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=devices,
            num_nodes=int(cfg.num_nodes),
            strategy=str(cfg.strategy),
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            inference_mode=False,
            enable_progress_bar=progress is not None,
            callbacks=[progress] if progress is not None else None,
        )
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as error:
        message = " ".join(str(error).split())
        raise InputError(f"{subject} strategy={cfg.strategy}", message) from None


def run_cohort(cohort: Cohort, cfg: DictConfig, redo: bool | None = None) -> CohortReport | None:
    """Register every pending unit of ``cohort`` with the processes of ``cfg`` (``device``,
    ``devices``, ``num_nodes``, ``strategy``, ``num_workers``, ``overwrite``, ``fail_fast``);
    ``redo`` (default: ``overwrite``) runs every unit, done or not.

    Returns:
        On global rank 0 the :class:`CohortReport`; on other ranks ``None``.

    Raises:
        DataError, CohortError: with ``fail_fast``, the first failure (rank 0 only).
    """
    if int(cfg.num_workers) < 0:
        raise InputError(f"num_workers={cfg.num_workers}", "must be >= 0")
    check_cohort_out(cohort.out, bool(cfg.overwrite))
    # read before this rank joins the others, so before any rank writes
    snapshot = Manifest(cohort.out).snapshot()
    jobs = pending_jobs(cohort, bool(cfg.overwrite) if redo is None else redo)
    if not jobs:  # every rank sees the same: nothing to start
        if rank_zero_only.rank != 0:
            return None
        return merge(cohort, snapshot, len(cohort.specs), 1, 0.0, torch.device("cpu"))
    runner = CohortRunner(cohort, jobs, snapshot, int(cfg.num_workers), bool(cfg.fail_fast))
    progress = CohortProgressBar(runner) if sys.stderr.isatty() else None
    with _quiet_lightning():
        trainer = build_trainer(cfg, progress)
        trainer.predict(runner, return_predictions=False)
    for process in getattr(trainer.strategy.launcher, "procs", []):
        process.wait()  # the ranks this process started
    report = runner.report
    if report is not None and cfg.fail_fast and report.failures:
        first = report.failures[0]
        raise (DataError if first["bad_input"] else CohortError)(first["error"])
    return report


def run_pair_folders(
    cfg: DictConfig,
    specs: Sequence[PairSpec],
    method: str,
    run: Callable[[PairInputs, torch.device], RegistrationResult],
    describe: Callable[[dict], str],
) -> Path:
    """``predict.py`` and ``register.py`` over a list: each pair's outputs in
    ``<out>/<pair>/`` (:func:`regnet.outputs.write_registration`), its line
    ``<folder>: describe(metrics)``; rank 0 writes ``<out>/summary.csv`` (a
    :func:`result_row` per pair) and prints the throughput. Returns ``out``.

    Raises:
        InputError: naming ``summary.csv`` when a pair failed (after all others ran).
    """
    out = Path(cfg.out)

    def write(method: str, spec: PairSpec, inputs: PairInputs, result: RegistrationResult) -> str:
        folder = out / spec.name
        write_registration(folder, inputs, result, overwrite=True, overview=bool(cfg.overview))
        return f"{folder}: {describe(result.metrics)}"

    cohort = Cohort(
        specs, [method], out, settings_of(cfg), lambda _, inputs, device: run(inputs, device), write
    )
    report = run_cohort(cohort, cfg)
    if report is not None:
        write_text_atomic(out / "summary.csv", rows_csv(report.rows))
        report.conclude(out / "summary.csv")
    return out
