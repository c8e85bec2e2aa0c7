"""Benchmarks of regnet against its peers; prints Markdown tables, optionally writes them.

Sub-commands:

* ``ops``: LNCC and warping against MONAI; forward + backward cost of ``lncc``, ``mi``, ``nmi``
  (``benchmarks/ops.py``).
* ``models``: inference and training-step seconds, peak memory, FLOPs and parameters of regnet's
  networks, VoxelMorph 0.3.4 ``VxmPairwise`` and MONAI ``VoxelMorph`` (``benchmarks/models.py``).
* ``accuracy``: regnet's default model and ``VxmPairwise`` trained with the same data, loss,
  optimiser and step budget; validation Dice and folding (``benchmarks/accuracy.py``).
* ``all``: the three in turn.

Examples::

    python scripts/benchmark.py models --shape 160,192,224 --shape 256,256 --repeats 3
    python scripts/benchmark.py accuracy --steps 1500 --out docs/benchmarks-accuracy.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks import accuracy, models  # noqa: E402

DEFAULT_SHAPES = ((160, 192, 224), (256, 256))
MODEL_COLUMNS = {
    "model": "model",
    "params": "parameters",
    "gflop": "GFLOP / forward",
    "infer_s": "inference s / pair",
    "speedup": f"speed-up vs {models.REFERENCE}",
    "bound_s": "FLOP bound s",
    "infer_peak_mb": "inference peak MiB",
    "train_s": "train step s",
    "train_peak_mb": "train peak MiB",
    "error": "error",
}
ACCURACY_COLUMNS = {
    "model": "model",
    "params": "parameters",
    "steps": "steps",
    "train_s": "training s",
    "dice": "val Dice",
    "dice_std": "Dice std",
    "identity_dice": "identity Dice",
    "folding_pct": "% folding (det J <= 0)",
    "infer_ms": "inference ms / pair",
}


def parse_shape(text: str) -> tuple[int, ...]:
    """``"160,192,224"`` or ``"160x192x224"`` -> ``(160, 192, 224)``."""
    try:
        shape = tuple(int(n) for n in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shape: expected sizes like 160,192,224, got {text!r}"
        ) from None
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape: need 2 or 3 positive sizes, got {text!r}")
    return shape


def markdown_table(rows: Sequence[dict], columns: dict[str, str] | None = None) -> str:
    """Rows of dicts -> Markdown table; ``columns`` maps keys to headers (default: all keys).

    Columns that no row fills are left out; floats get 3 significant digits (whole numbers from
    100 up), integers thousands separators.
    """
    if columns is None:
        columns = {key: key for row in rows for key in row}
    keys = [key for key in columns if any(row.get(key) is not None for row in rows)]
    lines = [
        "| " + " | ".join(columns[key] for key in keys) + " |",
        "|" + "|".join("---" for _ in keys) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key in keys) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value).replace("|", "/")


def environment(threads: int, device: str) -> str:
    """One line describing where the numbers come from (load average included)."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    where = (
        torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor()
    )
    return (
        f"torch {torch.__version__}, device {device} ({where or platform.machine()}), "
        f"{threads} threads of {os.cpu_count()} cores, load average {load}, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}"
    )


def run_ops(args: argparse.Namespace) -> str:
    from benchmarks.ops import run_ops_benchmark, run_similarity_benchmark

    sections = []
    for shape in args.shape:
        size = "x".join(map(str, shape))
        rows = run_ops_benchmark(shape, args.repeats, args.device)
        sections.append(f"### Operations, {size}\n\n{markdown_table(rows)}")
        rows = run_similarity_benchmark(shape, args.repeats, args.device)
        sections.append(f"### Similarity costs, {size}\n\n{markdown_table(rows)}")
    return "\n\n".join(sections)


def run_models(args: argparse.Namespace) -> str:
    options = models.RunOptions(
        device=args.device,
        threads=args.threads,
        bf16=args.bf16,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    sections = []
    for shape in args.shape:
        rows = models.run_models_benchmark(
            shape, args.repeats, args.train_repeats, args.models, options, log=_log
        )
        flags = [name for name in ("bf16", "channels_last", "compile") if getattr(args, name)]
        title = f"### Models, {'x'.join(map(str, shape))}, batch 1" + (
            f" ({', '.join(flags)})" if flags else ""
        )
        sections.append(f"{title}\n\n{markdown_table(rows, MODEL_COLUMNS)}")
    return "\n\n".join(sections)


def run_accuracy(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    config = accuracy.AccuracyConfig(
        shape=args.accuracy_shape,
        steps=args.steps,
        batch_size=args.batch_size,
        loss=args.loss,
        seed=args.seed,
        val_pairs=args.val_pairs,
        models=tuple(args.accuracy_models),
        device=args.device,
    )
    rows = accuracy.run_accuracy_benchmark(config, log=_log)
    return (
        f"### Accuracy at equal budget: {config.describe()}\n\n"
        f"{markdown_table(rows, ACCURACY_COLUMNS)}"
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    common.add_argument("--repeats", type=int, default=3, help="timed repeats after warm-up")
    common.add_argument(
        "--shape",
        type=parse_shape,
        action="append",
        help="spatial size, e.g. 160,192,224 (repeatable; default 160,192,224 and 256,256)",
    )
    common.add_argument("--out", type=Path, help="also write the Markdown to this file")
    common.add_argument("--train-repeats", type=int, default=1, help="timed training steps")
    common.add_argument("--models", nargs="+", default=list(models.MODELS), metavar="MODEL")
    common.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    common.add_argument("--channels-last", action="store_true", help="channels-last memory")
    common.add_argument("--compile", action="store_true", help="torch.compile the models")
    common.add_argument("--steps", type=int, default=1500, help="accuracy: training steps")
    common.add_argument("--batch-size", type=int, default=4, help="accuracy: pairs per step")
    common.add_argument("--loss", default="lncc+grad", help="accuracy: regnet loss spec")
    common.add_argument("--seed", type=int, default=0, help="accuracy: seed")
    common.add_argument("--val-pairs", type=int, default=64, help="accuracy: validation pairs")
    common.add_argument(
        "--accuracy-models", nargs="+", default=["voxelmorph", "vxm"], metavar="MODEL"
    )
    common.add_argument(
        "--accuracy-shape", type=parse_shape, default=(96, 96), help="accuracy: 2D image size"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("ops", "LNCC and warp against MONAI; lncc, mi, nmi cost"),
        ("models", "speed, memory and FLOPs of the networks"),
        ("accuracy", "accuracy at an equal training budget"),
        ("all", "ops, models and accuracy"),
    ):
        commands.add_parser(name, parents=[common], help=text)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.shape = args.shape or list(DEFAULT_SHAPES)
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    unknown = [name for name in args.models if name not in models.MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {list(models.MODELS)}")
    torch.set_num_threads(args.threads)
    runners = {"ops": [run_ops], "models": [run_models], "accuracy": [run_accuracy]}
    runners["all"] = [run_ops, run_models, run_accuracy]
    header = environment(args.threads, args.device)
    sections = [f"Environment: {header}"]
    for runner in runners[args.command]:
        sections.append(runner(args))
    given = sys.argv[1:] if argv is None else list(argv)
    sections.append(f"Command: `python scripts/benchmark.py {' '.join(given)}`")
    text = "\n\n".join(sections) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
