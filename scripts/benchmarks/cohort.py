"""Cost of running a list of pairs in one process, in several, and of resuming it.

Builds ``--pairs`` synthetic 3D pairs of ``--size``^3 voxels at 2 mm
(:class:`regnet.data.synthetic.SyntheticPairs`: random smooth label maps, a random diffeomorphic
field, a different contrast per image; labels for Dice) in ``--work``, then runs
``evaluate.py methods=<--methods> pairs=<list>``:

1. in one process with ``--threads`` threads;
2. in one process with ``--threads / --devices`` threads, the per-process thread count of run 3
   (per-pair metrics must be identical to run 3's: the optimisation's floating-point sums depend
   on the thread count, so runs 1 and 3 differ slightly);
3. in ``--devices`` processes (Lightning DDP, gloo on the CPU) with ``--threads / --devices``
   threads each, so runs 1 and 3 have the same cores;
4. the third command again, unchanged: every pair is done, so it measures what a resume costs
   per skipped pair (reading the list and the manifest, starting the command).

Reported (Markdown, ``--markdown``): wall-clock seconds of each command (start-up included),
pairs per minute and seconds per pair from them, the loop's own time and peak memory from the
command's throughput line, the throughput ratio of runs 3 and 1, and whether the per-pair metrics
of runs 2 and 3 are identical (every column of ``per_pair.csv`` but ``seconds``; where they are
not, the largest difference), with the largest difference between runs 1 and 3.

Example: ``python scripts/benchmarks/cohort.py --pairs 24 --size 48 --markdown cohort.md``.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from regnet.data.synthetic import SyntheticPairs

REPO = Path(__file__).resolve().parents[2]
SPACING_MM = 2.0
THROUGHPUT = re.compile(
    r"(?P<pairs>\d+) pairs run in (?P<seconds>[\d.]+) s on (?P<processes>\d+) process.*"
    r"peak memory (?P<memory>\d+) MiB"
)


def write_pairs(folder: Path, count: int, size: int, seed: int) -> Path:
    """``count`` synthetic pairs as NIfTI files (2 mm voxels) and their list ``pairs.csv``."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = SyntheticPairs((size, size, size), num_labels=8, length=count, seed=seed)
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    rows = ["fixed,moving,fixed_label,moving_label"]
    for index in range(count):
        item = pairs[index]
        names = []
        for key, dtype in (
            ("fixed", np.float32),
            ("moving", np.float32),
            ("fixed_label", np.int16),
            ("moving_label", np.int16),
        ):
            name = f"{index:03d}_{key}.nii.gz"
            data = item[key][0].numpy().astype(dtype)
            nib.save(nib.Nifti1Image(data, affine), str(folder / name))
            names.append(name)
        rows.append(",".join(names))
    listing = folder / "pairs.csv"
    listing.write_text("\n".join(rows) + "\n")
    return listing


def run_evaluate(arguments: list[str], threads: int, timeout: float) -> dict:
    """Run ``evaluate.py`` in a fresh process; wall seconds and its throughput line's numbers."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, str(REPO / "evaluate.py"), *arguments]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    match = THROUGHPUT.search(done.stdout)
    if match is None:
        raise RuntimeError(f"no throughput line in the output of {' '.join(command)}")
    return {
        "wall_s": wall,
        "registered": int(match["pairs"]),
        "loop_s": float(match["seconds"]),
        "peak_mib": int(match["memory"]),
    }


def per_pair(out: Path) -> list[dict]:
    """``per_pair.csv`` rows without their ``seconds``."""
    with open(out / "per_pair.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row.pop("seconds")
    return rows


def largest_difference(first: list[dict], second: list[dict]) -> float:
    """Largest absolute difference between numeric cells of two equally ordered tables."""
    largest = 0.0
    for a, b in zip(first, second, strict=True):
        for key, value in a.items():
            try:
                largest = max(largest, abs(float(value) - float(b[key])))
            except ValueError:
                if value != b[key]:
                    return float("inf")
    return largest


def report(runs: dict[str, dict], count: int, same: float, threads: float) -> str:
    """Markdown table of ``runs`` (one process, one process with fewer threads, several
    processes, the resume) and the ratios; ``same``: the largest per-pair difference between
    runs 2 and 3, ``threads``: between runs 1 and 3."""
    lines = [
        "| run | processes × threads | wall s | pairs/min (wall) | s/pair (wall) "
        "| loop s/pair | peak MiB per process |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        registered = run["registered"]
        per_pair = run["wall_s"] / (registered or count)  # a resume: per skipped pair
        rate = f"{60 / per_pair:.2f}" if registered else "–"
        loop = f"{run['loop_s'] / registered:.2f}" if registered else "–"
        lines.append(
            f"| {name} | {run['layout']} | {run['wall_s']:.1f} | {rate} | {per_pair:.2f} "
            f"| {loop} | {run['peak_mib']} |"
        )
    one, single, many, resume = runs.values()
    verdict = "identical" if same == 0 else f"differ (largest difference {same:.3g})"
    lines += [
        "",
        f"Throughput ratio ({many['layout']} / {one['layout']}, wall): "
        f"{one['wall_s'] / many['wall_s']:.2f}; loop only: {one['loop_s'] / many['loop_s']:.2f}.",
        f"Per-pair metrics, {many['layout']} against {single['layout']}: {verdict}; against "
        f"{one['layout']} (other thread count): largest difference {threads:.3g}.",
        f"Resume (all {count} pairs done): {resume['wall_s'] / count:.3f} s per skipped pair "
        f"({resume['wall_s']:.1f} s for the command).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--size", type=int, default=48, help="voxels per axis")
    parser.add_argument("--methods", default="register:svf", help="evaluate.py methods")
    parser.add_argument("--register", default=None, help="evaluate.py register={...} settings")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of the one process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("outputs/cohort_benchmark"))
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per command")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads % args.devices:
        parser.error("--threads must be a multiple of --devices (the same cores for both runs)")
    listing = write_pairs(args.work / "pairs", args.pairs, args.size, args.seed)
    common = [f"pairs={listing}", f"methods=[{args.methods}]", "device=cpu"]
    if args.register:
        common.append(f"register={args.register}")
    outs = {name: args.work / name for name in ("one", "single", "many")}
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    threads = args.threads // args.devices
    layouts = {
        "1 process": (f"1 × {args.threads}", ["devices=1", f"out={outs['one']}"], args.threads),
        f"1 process, {threads} thread(s)": (
            f"1 × {threads}",
            ["devices=1", f"out={outs['single']}"],
            threads,
        ),
        f"{args.devices} processes": (
            f"{args.devices} × {threads}",
            [f"devices={args.devices}", f"out={outs['many']}"],
            threads,
        ),
    }
    layouts["resume (rerun)"] = layouts[f"{args.devices} processes"]
    runs = {}
    for name, (layout, extra, count) in layouts.items():
        runs[name] = dict(run_evaluate([*common, *extra], count, args.timeout), layout=layout)
        print(f"{name}: {runs[name]['wall_s']:.1f} s", flush=True)
    one, single, many = (per_pair(outs[name]) for name in ("one", "single", "many"))
    text = report(runs, args.pairs, largest_difference(single, many), largest_difference(one, many))
    heading = (
        f"### {args.pairs} pairs of {args.size}³ voxels, methods={args.methods}"
        + (f", register={args.register}" if args.register else "")
        + "\n\n"
    )
    print(heading + text, end="")
    if args.markdown:
        args.markdown.write_text(heading + text)


if __name__ == "__main__":
    main()
