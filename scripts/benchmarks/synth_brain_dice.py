"""Dice of a brain-network checkpoint on synthetic bank pairs of three difficulties.

    python scripts/benchmarks/synth_brain_dice.py CKPT [--bank data/brain_labels] [--pairs 4]

Pairs come from the label bank only (seed 1, the validation seed), with the checkpoint's own
geometry settings (residual affine, velocity, pose), rendered three ways: ``all`` (every
augmentation, as the validation set), ``t1`` (T1-like contrast on both sides, with blur, bias,
slices, noise and shells) and ``clean`` (``easy_prob=1``: one T1-like contrast, no corruption).
Dice: moving labels warped by nearest neighbour, mean over the brain labels present
(:func:`regnet.module.pair_metrics`), for the identity and for the network's field. The bank's
grid must be the checkpoint's (``data.shape``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from regnet.checkpoint import read_checkpoint
from regnet.data.synth_brain import SynthBrainPairs
from regnet.module import pair_metrics
from regnet.pipeline import load_network

GEOMETRY = (
    "velocity_std_mm",
    "velocity_spacing_mm",
    "max_rotation_deg",
    "max_translation_mm",
    "max_log_scale",
    "max_shear",
    "pose_rotation_deg",
    "pose_translation_mm",
)
RENDERINGS = {"all": {}, "t1": {"contrast_weights": {"t1": 1.0}}, "clean": {"easy_prob": 1.0}}


def dice_table(checkpoint: str, bank: Path, pairs: int) -> dict[str, tuple[float, float]]:
    """``{rendering: (identity Dice, network Dice)}`` averaged over ``pairs`` pairs."""
    model = load_network(checkpoint).model
    data = read_checkpoint(checkpoint)["hyper_parameters"]["config"]["data"]
    geometry = {key: data["train"][key] for key in GEOMETRY}
    table = {}
    for name, rendering in RENDERINGS.items():
        dataset = SynthBrainPairs(
            data["shape"], bank=bank, bank_fraction=1.0, num_labels=data["num_labels"],
            seed=1, length=pairs, **geometry, **rendering,
        )  # fmt: skip
        identity, network = [], []
        with torch.no_grad():
            for index in range(pairs):
                batch = {key: value[None] for key, value in dataset[index].items()}
                ddf = model(batch["fixed"], batch["moving"])["ddf"]
                network.append(pair_metrics(batch, ddf)["dice"])
                identity.append(pair_metrics(batch, torch.zeros_like(ddf))["dice"])
        table[name] = (sum(identity) / pairs, sum(network) / pairs)
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--bank", type=Path, default=Path("data/brain_labels"))
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args(argv)
    for name, (identity, network) in dice_table(args.checkpoint, args.bank, args.pairs).items():
        print(f"{name}: identity {identity:.3f} network {network:.3f}")


if __name__ == "__main__":
    main()
