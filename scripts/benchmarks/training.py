"""Validation Dice and folding of each deformable model after a fixed CPU training budget.

Trains every deformable model with the same data (the default synthetic 2D pairs), loss,
optimiser and step budget through the regular training code (``regnet.cli.train.train``), then
reports the identity Dice of the validation pairs beside each model's validation Dice (labels
warped by nearest neighbour), % of voxels with det J <= 0, SDlogJ and the wall time.

    python scripts/benchmarks/training.py --steps 3000 --loss dice+grad --out training.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from regnet.cli.config import config_dir
from regnet.cli.train import train
from regnet.metrics import dice_per_label

MODELS = ("voxelmorph", "voxelmorph_diff", "bspline", "affine_voxelmorph")


def compose_run(model: str, args: argparse.Namespace, output_dir: Path):
    """The ``train`` config of one benchmark run: only the model differs between runs."""
    overrides = [
        f"model={model}",
        "trainer=cpu",
        f"loss={args.loss}",
        f"optimizer.lr={args.lr}",
        f"seed={args.seed}",
        f"paths.output_dir={output_dir}",
        f"trainer.max_steps={args.steps}",
        "trainer.max_epochs=-1",
        f"+trainer.val_check_interval={args.val_every}",
        "trainer.check_val_every_n_epoch=null",
        "~callbacks.progress_bar",
        "+trainer.enable_progress_bar=false",
        "val_panel_every_n_epochs=0",
        f"data.val.length={args.val_pairs}",
        f"data.train.length={args.val_every * 8}",
        *args.override,
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=overrides)


def identity_dice(cfg) -> float:
    """Mean over validation pairs of the mean Dice of unregistered label maps."""
    dataset = instantiate(cfg.data.val)
    scores = []
    for index in range(len(dataset)):
        item = dataset[index]
        per_label = dice_per_label(item["moving_label"][0], item["fixed_label"][0])
        scores.append(sum(per_label.values()) / len(per_label))
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--val-every", type=int, default=250, help="steps between validations")
    parser.add_argument("--val-pairs", type=int, default=64)
    parser.add_argument("--loss", default="ncc+grad")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        help="extra train overrides, e.g. loss_weights.grad=0.1",
    )
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            cfg = compose_run(model, args, Path(tmp) / model)
            if not rows:
                rows.append(("identity", identity_dice(cfg), 0.0, 0.0, 0.0))
            start = time.perf_counter()
            trainer = train(cfg)
            seconds = time.perf_counter() - start
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            rows.append(
                (
                    model,
                    metrics["val/dice"],
                    metrics["val/folding_percent"],
                    metrics["val/sdlogj"],
                    seconds,
                )
            )

    lines = [
        f"Synthetic 2D 64×64 pairs, loss `{args.loss}` {' '.join(args.override)}, Adam lr "
        f"{args.lr}, {args.steps} steps at "
        f"batch 8, {args.threads} CPU threads, {args.val_pairs} validation pairs (seed-fixed); "
        "best checkpoint by validation Dice.",
        "",
        "| model | val Dice | % det J ≤ 0 | SDlogJ | train s |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {d:.3f} | {f:.4f} | {s:.3f} | {t:.0f} |" for m, d, f, s, t in rows]
    gap = 1.0 - rows[0][1]
    lines += ["", "Fraction of the identity Dice gap to 1.0 removed:"]
    lines += [f"- {m}: {(d - rows[0][1]) / gap:.0%}" for m, d, *_ in rows[1:]]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
