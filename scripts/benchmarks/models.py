"""Speed, memory and FLOPs of regnet's networks and their peers, on identical inputs.

Models compared (``MODELS``): regnet's ``voxelmorph`` default, ``voxelmorph_diff`` and the paper
presets ``vm1`` / ``vm2`` (all through :func:`regnet.nets.build_model`), VoxelMorph 0.3.4
``VxmPairwise`` and MONAI ``VoxelMorph``, both with their own defaults. Every model is wrapped as
``forward(fixed, moving) -> ddf`` in regnet's convention (``(B, ndim, *S)``, voxels of the fixed
grid, tensor axis order, backward mapping; see :mod:`regnet.spatial`).

Each model lives in its own worker process (``spawn``), so the peak memory it reports is its
own: on CPU the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before each
call) minus the resident set just before the call; on CUDA ``torch.cuda.max_memory_allocated``
minus the memory allocated before the call. The parent drives the workers round-robin (one
warm-up round, then ``repeats`` timed rounds), so every model's timings share the same machine
load and their ratios stay meaningful on a busy machine.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix
products; interpolation and grid sampling are not counted) on an input whose sides are multiples
of 32 near ``shape / 2`` and scaled by the voxel ratio, which is exact for these fully
convolutional networks. The physical bound of a CPU time is the forward FLOPs divided by the
throughput of a 3D 16->16-channel 3x3x3 convolution, measured before every inference round of
the same run (the best round counts, as the bound is a lower bound on time).
"""

from __future__ import annotations

import gc
import math
import multiprocessing as mp
import os
import re
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from regnet.losses import build_loss
from regnet.nets import build_model, count_parameters
from regnet.spatial import warp

# regnet models: key -> build_model arguments
REGNET_MODELS: dict[str, dict] = {
    "voxelmorph": {"name": "voxelmorph"},
    "voxelmorph_diff": {"name": "voxelmorph_diff"},
    "vm1": {"name": "voxelmorph", "preset": "vm1"},
    "vm2": {"name": "voxelmorph", "preset": "vm2"},
}
# every model: key (``--models``) -> label in the tables
MODELS: dict[str, str] = {
    "voxelmorph": "regnet voxelmorph (default)",
    "voxelmorph_diff": "regnet voxelmorph_diff (default)",
    "vm1": "regnet voxelmorph, preset vm1",
    "vm2": "regnet voxelmorph, preset vm2",
    "vxm": "VoxelMorph 0.3.4 VxmPairwise",
    "monai": "MONAI VoxelMorph",
}
REFERENCE = "vxm"  # speed-ups are quoted relative to this model
TRAIN_LOSS = "lncc+grad"
INPUT_SEED = 0
_CONV_CHANNELS = 16


class DDFModel(nn.Module):
    """Adapter: ``forward(fixed, moving) -> ddf`` ``(B, ndim, *S)`` in regnet's convention."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        if self.kind == "regnet":
            return self.model(fixed, moving)["ddf"]
        if self.kind == "vxm":
            # VxmPairwise(source, target) returns the displacement integrated from its velocity
            # (``integration_steps=5``) with which its SpatialTransformer warps ``source`` onto
            # ``target``: voxels, tensor axis order, backward; the same convention as regnet's
            # DDF (checked in tests/test_benchmark_scripts.py).
            return self.model(moving, fixed)
        # MONAI VoxelMorph(moving, fixed) returns (warped, ddf); MONAI's Warp uses the same
        # convention as regnet (voxels, tensor axis order, backward, align_corners=True).
        return self.model(moving, fixed)[1]


def build_benchmark_model(key: str, ndim: int) -> DDFModel:
    """The model ``key`` (of :data:`MODELS`) for ``ndim`` = 2 or 3, wrapped as a DDF model."""
    if key in REGNET_MODELS:
        return DDFModel(build_model(ndim=ndim, **REGNET_MODELS[key]), "regnet")
    if key == "vxm":
        import voxelmorph as vxm

        return DDFModel(vxm.nn.models.VxmPairwise(ndim, 1, 1), "vxm")
    if key == "monai":
        from monai.networks.nets import VoxelMorph

        return DDFModel(VoxelMorph(spatial_dims=ndim), "monai")
    raise ValueError(f"unknown benchmark model {key!r}; choose from {list(MODELS)}")


def benchmark_inputs(
    shape: Sequence[int], device: torch.device, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Identical seeded ``fixed``, ``moving`` ``(1, 1, *shape)`` images in ``[0, 1)``."""
    generator = torch.Generator().manual_seed(INPUT_SEED)
    fixed, moving = torch.rand(2, 1, 1, *shape, generator=generator).to(device)
    if channels_last:
        fixed, moving = to_channels_last(fixed), to_channels_last(moving)
    return fixed, moving


def channels_last_format(ndim: int) -> torch.memory_format:
    """``channels_last`` for 2D, ``channels_last_3d`` for 3D."""
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=channels_last_format(x.dim() - 2))


def flop_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Smaller shape for FLOP counting: each side a multiple of 32 near half the original."""
    return tuple(max(32, 32 * round(n / 64)) for n in shape)


def count_flops(model: nn.Module, shape: Sequence[int]) -> float:
    """Forward FLOPs of ``model`` at ``shape`` (counted at :func:`flop_shape`, scaled)."""
    small = flop_shape(shape)
    fixed, moving = benchmark_inputs(small, next(model.parameters()).device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(fixed, moving)
    return counter.get_total_flops() * math.prod(shape) / math.prod(small)


def conv_throughput(
    shape: Sequence[int] = (80, 96, 112), repeats: int = 3, device: str = "cpu"
) -> float:
    """GFLOP/s of a 3D 16->16-channel 3x3x3 convolution (padding 1) on ``(1, 16, *shape)``.

    Median of ``repeats`` after one warm-up, in inference mode; FLOPs = 2 * 27 * 16 * 16 * voxels.
    """
    dev = torch.device(device)
    conv = nn.Conv3d(_CONV_CHANNELS, _CONV_CHANNELS, 3, padding=1).to(dev)
    x = torch.rand(1, _CONV_CHANNELS, *shape, device=dev)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = _now(dev)
            conv(x)
            times.append(_now(dev) - start)
    flops = 2 * 27 * _CONV_CHANNELS**2 * math.prod(shape)
    return flops / statistics.median(times[1:]) / 1e9


@dataclass(frozen=True)
class RunOptions:
    """How a worker runs its model."""

    device: str = "cpu"
    threads: int = 1
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    loss: str = TRAIN_LOSS


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process; False where that is unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(resettable: bool) -> int:
    if resettable:
        with open("/proc/self/status") as f:
            match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        if match:
            return int(match.group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Runner:
    """One model, its inputs and (for training) optimiser and loss, inside a worker."""

    def __init__(self, label: str, shape: Sequence[int], options: RunOptions) -> None:
        torch.set_num_threads(options.threads)
        torch.manual_seed(INPUT_SEED)
        self.device = torch.device(options.device)
        self.options = options
        model = build_benchmark_model(label, len(shape)).to(self.device)
        if options.channels_last:
            model = model.to(memory_format=channels_last_format(len(shape)))
        self.model = torch.compile(model) if options.compile else model
        self.parameters = list(model.parameters())
        self.fixed, self.moving = benchmark_inputs(shape, self.device, options.channels_last)
        self.loss = build_loss(options.loss).to(self.device)
        self.optimiser = torch.optim.Adam(self.parameters, lr=1e-4)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.options.bf16)

    def infer(self) -> None:
        self.model.eval()
        with torch.inference_mode(), self._autocast():
            self.model(self.fixed, self.moving)

    def train_step(self) -> None:
        self.model.train()
        self.optimiser.zero_grad(set_to_none=True)
        with self._autocast():
            ddf = self.model(self.fixed, self.moving).float()
        warped = warp(self.moving, ddf)
        total, _ = self.loss(
            {"fixed": self.fixed, "moving": self.moving, "warped": warped, "ddf": ddf}
        )
        total.backward()
        self.optimiser.step()

    def measure(self, mode: str) -> dict[str, float]:
        """Run ``mode`` ("infer" or "train") once: seconds and peak extra memory in bytes."""
        action: Callable[[], None] = self.infer if mode == "infer" else self.train_step
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        else:
            resettable = _reset_peak_rss()
            before = _rss_bytes()
        start = _now(self.device)
        action()
        seconds = _now(self.device) - start
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - before
        else:
            peak = _peak_rss_bytes(resettable) - before
        return {"seconds": seconds, "peak_bytes": max(peak, 0)}


def _worker(conn, label: str, shape: tuple[int, ...], options: RunOptions) -> None:
    """Worker process: build the model, then answer "infer"/"train" commands until ``None``."""
    try:
        runner = _Runner(label, shape, options)
        conn.send({"ready": True})
    except Exception as error:  # reported to the parent, which shows it in the table
        conn.send({"error": f"{type(error).__name__}: {error}"})
        return
    while (mode := conn.recv()) is not None:
        try:
            conn.send(runner.measure(mode))
        except Exception as error:
            conn.send({"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"})


def _ask(conn, mode: str | None) -> dict:
    """Send ``mode`` to a worker (``None``: only wait for its greeting) and return its answer."""
    try:
        if mode is not None:
            conn.send(mode)
        return conn.recv()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return {"error": "worker process died (out of memory?)"}


def run_models_benchmark(
    shape: Sequence[int],
    repeats: int = 3,
    train_repeats: int = 1,
    labels: Sequence[str] = MODELS,
    options: RunOptions | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Benchmark ``labels`` at ``shape`` (2D or 3D, batch 1): one row per model.

    Inference: one warm-up round then ``repeats`` rounds, interleaved across models; training
    steps (forward, ``options.loss``, backward, Adam step): one warm-up then ``train_repeats``
    (0 skips training). ``labels`` are keys of :data:`MODELS`. Row keys: ``model``, ``params``,
    ``gflop`` (per forward), ``infer_s`` (median), ``bound_s`` (CPU only: ``gflop`` / conv
    GFLOP/s), ``infer_peak_mb``, ``train_s``, ``train_peak_mb``, ``speedup`` (reference
    seconds / model seconds), ``error``.
    """
    options = options or RunOptions(threads=os.cpu_count() or 1)
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"--shape must have 2 or 3 positive sizes, got {list(shape)}")
    unknown = [label for label in labels if label not in MODELS]
    if unknown:
        raise ValueError(f"unknown benchmark models {unknown}; choose from {list(MODELS)}")
    torch.set_num_threads(options.threads)
    rows = {label: {"model": MODELS[label]} for label in labels}
    for label in labels:
        model = build_benchmark_model(label, len(shape))
        rows[label]["params"] = count_parameters(model)
        rows[label]["gflop"] = count_flops(model, shape) / 1e9

    context = mp.get_context("spawn")
    workers = {}
    for label in labels:
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(child, label, shape, options))
        process.start()
        child.close()  # so that a dead worker shows as EOF on ``parent``
        workers[label] = (process, parent)
    live = []
    for label, (_, conn) in workers.items():
        answer = _ask(conn, None)
        if "error" in answer:
            rows[label]["error"] = answer["error"]
        else:
            live.append(label)
    throughputs: list[float] = []  # conv GFLOP/s, measured once per inference round
    try:
        for mode, timed in (("infer", repeats), ("train", train_repeats)):
            if timed < 1:
                continue
            seconds: dict[str, list[float]] = {label: [] for label in live}
            peaks: dict[str, int] = dict.fromkeys(live, 0)
            for round_index in range(timed + 1):
                if mode == "infer" and options.device == "cpu":
                    throughputs.append(conv_throughput(repeats=1))
                    log(f"3D 16->16 conv: {throughputs[-1]:.1f} GFLOP/s")
                for label in list(live):
                    answer = _ask(workers[label][1], mode)
                    if "error" in answer:
                        rows[label]["error"] = f"{mode}: {answer['error']}"
                        live.remove(label)
                        continue
                    peaks[label] = max(peaks[label], answer["peak_bytes"])
                    if round_index > 0:
                        seconds[label].append(answer["seconds"])
                    log(f"{mode} {label} round {round_index}: {answer['seconds']:.3f} s")
            for label in live:
                rows[label][f"{mode}_s"] = statistics.median(seconds[label])
                rows[label][f"{mode}_peak_mb"] = peaks[label] / 2**20
    finally:
        for process, conn in workers.values():
            if process.is_alive():
                conn.send(None)
            process.join(timeout=60)
    if throughputs:
        # the bound is a lower bound on time: use the best throughput seen (least loaded round)
        best = max(throughputs)
        log(f"best 3D 16->16 conv throughput: {best:.1f} GFLOP/s")
        for row in rows.values():
            row["bound_s"] = row["gflop"] / best
    reference = rows.get(REFERENCE, {}).get("infer_s")
    for row in rows.values():
        if reference and row.get("infer_s"):
            row["speedup"] = reference / row["infer_s"]
    return list(rows.values())
