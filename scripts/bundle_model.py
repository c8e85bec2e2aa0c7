"""Store a trained checkpoint inside the package as a bundled model (``predict.py ckpt=NAME``).

    python scripts/bundle_model.py outputs/synth_brain_2mm/<run>/checkpoints/last.ckpt \
        --name brain --affine-start

writes ``regnet/weights/<file of NAME>`` (:data:`regnet.bundled.BUNDLED_MODELS`): the weights, the
training config and version only (:func:`regnet.bundled.bundle_checkpoint`). ``--affine-start``
records ``predict.affine_start: true`` in it, for networks trained on affinely aligned pairs.
"""

from __future__ import annotations

import argparse

from regnet.bundled import BUNDLED_MODELS, WEIGHTS_DIR, bundle_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="regnet-train checkpoint (.ckpt)")
    parser.add_argument("--name", required=True, choices=sorted(BUNDLED_MODELS))
    parser.add_argument(
        "--affine-start",
        action="store_true",
        help="predict.py runs register.py's affine alignment before this network",
    )
    args = parser.parse_args()
    settings = {"predict": {"affine_start": True}} if args.affine_start else None
    target = bundle_checkpoint(args.checkpoint, WEIGHTS_DIR / BUNDLED_MODELS[args.name], settings)
    print(f"{target}: {target.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
