"""Where ``register.py``'s registration time goes, scenario by scenario, beside the peers' times.

Reads the output folders of a :mod:`realistic` run (``--work``, ``seed<S>/<spacing>mm/<scenario>/``)
and prints, for each scenario whose ``regnet`` folder holds a ``metrics.json``: its registration
seconds split by stage from ``info.level_seconds`` (``start``: the rotation search and its
polishing; ``affine``: the affine pre-stage, all levels; one column per deformable level, coarse
to fine; ``rest``: everything else in the registration seconds: resampling onto the working grid,
pyramids, masks, descriptor set-up, the start check, the field in mm), and the registration
seconds of ANTs SyN and Greedy from their ``run.json`` where they ran, with regnet's time as a
fraction of each. Times come from one run; ratios are per scenario, their median last.

Usage::

    python scripts/benchmarks/realistic.py --spacing 2 --methods ants-syn,greedy,regnet \\
        --no-regnet-labels
    python scripts/benchmarks/time_split.py --spacing 2 --markdown split.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

PEERS = ("ants-syn", "greedy")
STARTS = ("search",)
AFFINE_STAGES = ("rigid", "affine")


def split_seconds(metrics: dict) -> dict[str, float]:
    """``register.py``'s ``metrics.json`` -> seconds per stage: ``start``, ``affine``, one
    ``<transform> L<level>`` per deformable level in level order, ``rest`` (the registration
    seconds not spent in any of them) and ``total`` (the registration seconds)."""
    total = float(metrics["seconds"])
    split = {"start": 0.0, "affine": 0.0}
    deformable: dict[tuple[int, str], float] = {}
    for key, seconds in metrics["info"]["level_seconds"].items():
        stage, level = key.split("/level")
        if stage in STARTS:
            split["start"] += seconds
        elif stage in AFFINE_STAGES:
            split["affine"] += seconds
        else:
            name = (int(level), stage)
            deformable[name] = deformable.get(name, 0.0) + seconds
    for (level, stage), seconds in sorted(deformable.items()):
        split[f"{stage} L{level}"] = seconds
    split["rest"] = total - sum(split.values())
    split["total"] = total
    return split


def peer_seconds(folder: Path) -> float | None:
    """Registration seconds a peer's ``run.json`` records in ``folder``, or ``None``."""
    record = folder / "run.json"
    if not record.is_file():
        return None
    return float(json.loads(record.read_text())["seconds"])


def table(run_dir: Path) -> list[str]:
    """Markdown rows for every scenario under ``run_dir`` (``seed<S>/<spacing>mm``)."""
    rows, columns, ratios = [], None, {peer: [] for peer in PEERS}
    for scenario in sorted(p for p in run_dir.iterdir() if (p / "regnet/metrics.json").is_file()):
        split = split_seconds(json.loads((scenario / "regnet/metrics.json").read_text()))
        if columns is None:
            columns = list(split)
        cells = [f"{split.get(name, 0.0):.2f}" for name in columns]
        for peer in PEERS:
            seconds = peer_seconds(scenario / peer)
            if seconds is None:
                cells += ["", ""]
                continue
            ratios[peer].append(split["total"] / seconds)
            cells += [f"{seconds:.2f}", f"{split['total'] / seconds:.2f}x"]
        rows.append(f"| {scenario.name} | " + " | ".join(cells) + " |")
    if columns is None:
        raise SystemExit(f"error: {run_dir}: no scenario folder with regnet/metrics.json")
    peer_columns = [text for peer in PEERS for text in (f"{peer} s", f"regnet / {peer}")]
    header = ["scenario", *(f"{name} s" for name in columns), *peer_columns]
    median = ["median", *[""] * len(columns)]
    for peer in PEERS:
        values = ratios[peer]
        median += ["", f"{statistics.median(values):.2f}x" if values else ""]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *rows,
        "| " + " | ".join(median) + " |",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "regnet-realistic"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", default="2", help="the run's spacing (mm), e.g. 2 or 1")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    run_dir = args.work / f"seed{args.seed}" / f"{float(args.spacing):g}mm"
    if not run_dir.is_dir():
        raise SystemExit(f"error: {run_dir}: no such run folder (run realistic.py first)")
    text = "\n".join(table(run_dir)) + "\n"
    print(text, end="")
    if args.markdown is not None:
        args.markdown.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
