"""One peer registration (ANTs via antspyx, Greedy via picsl-greedy) in a process of its own,
for ``realistic.py``: the process imports nothing else, so its wall time is what a user's
script calling the tool would take (start-up, import, reading, registration, writing the warped
image, exit).

Usage (``realistic.py`` runs it)::

    python scripts/benchmarks/peer.py ants-syn --pair PAIR_DIR --out OUT_DIR --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ANTS_METHODS = {"ants-affine": "Affine", "ants-syn": "SyN"}
PEER_FIELD = "field_itk.nii.gz"  # composed peer transform, ITK convention (LPS components)


def run_one(method: str, pair_dir: Path, out: Path, threads: int) -> None:
    """Register one pair with a peer; write ``warped.nii.gz`` (the tool's own resampling),
    :data:`PEER_FIELD` and ``run.json`` (``seconds``: registration, ``export_seconds``: writing
    the composed field)."""
    fixed, moving = str(pair_dir / "fixed.nii.gz"), str(pair_dir / "moving.nii.gz")
    warped, field = str(out / "warped.nii.gz"), str(out / PEER_FIELD)
    if method in ANTS_METHODS:
        import ants

        fixed_image, moving_image = ants.image_read(fixed), ants.image_read(moving)
        start = time.perf_counter()
        result = ants.registration(
            fixed_image, moving_image, ANTS_METHODS[method], outprefix=str(out / "ants_")
        )
        seconds = time.perf_counter() - start
        ants.image_write(result["warpedmovout"], warped)
        export = time.perf_counter()
        composed = ants.apply_transforms(
            fixed_image, moving_image, result["fwdtransforms"], compose=str(out / "composed_")
        )
        os.replace(composed, field)
    else:
        from picsl_greedy import Greedy3D

        greedy = Greedy3D()
        affine, warp = str(out / "affine.mat"), str(out / "warp.nii.gz")
        common = f"-d 3 -threads {threads} -seed 1"
        start = time.perf_counter()
        greedy.execute(
            f"{common} -a -dof 12 -m NMI -i {fixed} {moving} -ia-image-centers -n 100x50x10 "
            f"-o {affine}"
        )
        greedy.execute(
            f"{common} -m NCC 2x2x2 -i {fixed} {moving} -it {affine} -n 100x50x10 -wp 0 -o {warp}"
        )
        seconds = time.perf_counter() - start
        greedy.execute(f"{common} -rf {fixed} -rm {moving} {warped} -r {warp} {affine}")
        export = time.perf_counter()
        greedy.execute(f"{common} -rf {fixed} -rc {field} -r {warp} {affine}")
    record = {
        "seconds": seconds,
        "export_seconds": time.perf_counter() - export,
    }
    (out / "run.json").write_text(json.dumps(record))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=[*ANTS_METHODS, "greedy"])
    parser.add_argument("--pair", type=Path, required=True, help="folder with fixed/moving.nii.gz")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    run_one(args.method, args.pair, args.out, args.threads)


if __name__ == "__main__":
    main()
