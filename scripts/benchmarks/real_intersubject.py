"""Real inter-subject pairs (two people's brains): `register.py` against ANTs and Greedy.

    python scripts/benchmarks/real_intersubject.py [--set slices|brains] [--methods header,
        ants-affine,ants-syn,greedy,regnet] [--variant dense=mind_sampling=false] [--threads 2]
        [--csv results.csv]

Two sets of real scans that install offline:

* ``slices``: the six real brain MRI slices that ship in antspyx's source distribution
  (``data/r16slice.jpg`` ... ``r85slice.jpg``: one axial T1 slice of each of six people,
  skull-stripped, 256 x 256 pixels, read as 1 mm); every ordered pair of two people (30).
* ``brains``: atlas to subject in 3D at 1 mm: Colin27 (``data/ch2.nii.gz`` of the same
  distribution: one person's skull-stripped T1, 181 x 217 x 181) and the ICBM 2009a symmetric
  template shipped in nilearn (an average of 152 people, skull-stripped, 197 x 233 x 189), both
  in MNI space; both directions (2 pairs).

Unlike the real-scan benchmark (``realistic.py``: one real brain against itself deformed by a
known smooth field) the anatomy differs as between subjects, so there is no known field; the
score is the overlap of tissue classes: each image is split into CSF, grey and white matter by
3-class k-means of its brain intensities (as ANTs' Atropos k-means initialisation does),
computed once from the image alone, and a method's warped moving classes (nearest neighbour)
are compared with the fixed image's. Dice is the mean over the three classes.

antspyx's source distribution is fetched with ``pip download antspyx --no-binary :all:`` into
``--work`` unless ``--data`` names its ``data`` folder. Every method reads the same NIfTI
files: ``register.py`` with no options (and ``--variant`` overrides) as
a command of its own (``reg s`` from its ``metrics.json``; ``total s`` the whole command, which
writes its usual outputs and ``overview.png``);
ANTs (``ants.registration(fixed, moving, "Affine" | "SyN")``, antspyx's defaults) and Greedy
(``-a -dof 12 -m NMI -ia-image-centers``, then ``-m NCC 2x2``, 100x50x10 each) in this process,
``reg s`` their registration calls. Folding (% of fixed pixels with det J <= 0) is regnet's
``metrics.json`` and ANTs' Jacobian of its warp; Greedy's is not computed.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SLICES = ("r16", "r27", "r30", "r62", "r64", "r85")
BRAINS = ("colin27", "icbm2009a")
SOURCE_FILES = [f"{name}slice.jpg" for name in SLICES] + ["ch2.nii.gz"]
CLASSES = {1: "CSF", 2: "GM", 3: "WM"}
METHODS = ("header", "ants-affine", "ants-syn", "greedy", "regnet")
ANTS_DEFAULT_VERSION = "0.6.3"


def antspyx_data(work: Path) -> Path:
    """The ``data`` folder of antspyx's source distribution, downloaded and unpacked under
    ``work`` once (the installed antspyx's version, else :data:`ANTS_DEFAULT_VERSION`)."""
    try:
        version = importlib.metadata.version("antspyx")
    except importlib.metadata.PackageNotFoundError:
        version = ANTS_DEFAULT_VERSION
    folder = work / f"antspyx-{version}" / "data"
    if all((folder / name).exists() for name in SOURCE_FILES):
        return folder
    archive = work / f"antspyx-{version}.tar.gz"
    if not archive.exists():
        command = [sys.executable, "-m", "pip", "download", f"antspyx=={version}"]
        command += ["--no-binary", ":all:", "--no-deps", "--quiet", "-d", str(work)]
        subprocess.run(command, check=True)
    with tarfile.open(archive) as bundle:
        wanted = {f"antspyx-{version}/data/{name}" for name in SOURCE_FILES}
        bundle.extractall(work, members=[m for m in bundle.getmembers() if m.name in wanted])
    return folder


def tissue_classes(image: np.ndarray, iterations: int = 50) -> np.ndarray:
    """``uint8`` map of ``image``: 0 background, then CSF / GM / WM (1 / 2 / 3) by 3-class
    k-means of the intensities above a tenth of the 99th percentile, started at the 1/6, 3/6
    and 5/6 quantiles; classes ordered by mean intensity (T1: CSF darkest, WM brightest)."""
    brain = image > 0.1 * np.percentile(image, 99)
    values = image[brain].astype(np.float64)
    centres = np.quantile(values, [1 / 6, 3 / 6, 5 / 6])
    for _ in range(iterations):
        nearest = np.abs(values[:, None] - centres[None]).argmin(1)
        updated = np.array([values[nearest == k].mean() for k in range(3)])
        if np.allclose(updated, centres):
            break
        centres = updated
    order = np.argsort(np.argsort(centres))  # class index by rank of its centre
    labels = np.zeros(image.shape, np.uint8)
    labels[brain] = order[np.abs(values[:, None] - centres[None]).argmin(1)] + 1
    return labels


def prepare(kind: str, data: Path, folder: Path) -> tuple[str, ...]:
    """The set's images as NIfTI files, ``<subject>.nii.gz``, with their tissue classes,
    ``<subject>_tissue.nii.gz``: the slices as 2D images (1 mm pixels, identity orientation),
    the brains with their own headers. Returns the subjects' names."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    if kind == "slices":
        for name in SLICES:
            pixels = np.asarray(Image.open(data / f"{name}slice.jpg").convert("L"), np.float32)
            image = np.ascontiguousarray(pixels.T)  # (x, y): axis 0 along the picture's width
            images[name] = (image, np.eye(4))
    else:
        from realistic import T1_FILE, package_file  # nilearn's ICBM 2009a T1

        for name, path in (("colin27", data / "ch2.nii.gz"), ("icbm2009a", package_file(*T1_FILE))):
            volume = nib.load(path)
            images[name] = (np.asarray(volume.dataobj, np.float32), volume.affine)
    for name, (image, affine) in images.items():
        nib.save(nib.Nifti1Image(image, affine), folder / f"{name}.nii.gz")
        labels = tissue_classes(image)
        nib.save(nib.Nifti1Image(labels, affine), folder / f"{name}_tissue.nii.gz")
    return tuple(images)


def dice_by_class(fixed: np.ndarray, warped: np.ndarray) -> dict[str, float]:
    """Dice of each tissue class and their mean (``dice``)."""
    scores = {}
    for value, name in CLASSES.items():
        a, b = fixed == value, warped == value
        scores[name] = 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))
    scores["dice"] = statistics.fmean(scores[name] for name in CLASSES.values())
    return scores


def run_regnet(fixed: Path, moving: Path, out: Path, overrides: list[str], threads: int) -> dict:
    """``register.py`` as users run it (``reg_s`` from its ``metrics.json``, ``total_s`` the
    whole command); the moving classes are resampled through its ``itk_warp.nii.gz`` by ANTs
    (``genericLabel``), as for ANTs' own transforms."""
    import ants

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, str(ROOT / "register.py"), f"fixed={fixed}", f"moving={moving}"]
    command += [f"out={out}", "overwrite=true", *overrides]
    start = time.perf_counter()
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    total = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError((process.stderr or process.stdout).strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    warped = ants.apply_transforms(
        ants.image_read(str(fixed)),
        ants.image_read(str(tissue_path(moving))),
        [str(out / "itk_warp.nii.gz")],
        interpolator="genericLabel",
    )
    return {
        "reg_s": metrics["seconds"],
        "total_s": total,
        "folding": metrics["folding_percent"],
        "warped": warped.numpy(),
    }


def run_ants(fixed: Path, moving: Path, out: Path, kind: str) -> dict:
    """ANTs ``Affine`` or ``SyN`` with antspyx's defaults; the moving classes resampled by
    ``genericLabel``; folding from the Jacobian determinant of SyN's warp."""
    import ants

    fixed_image, moving_image = ants.image_read(str(fixed)), ants.image_read(str(moving))
    start = time.perf_counter()
    result = ants.registration(fixed_image, moving_image, kind, outprefix=str(out / "ants_"))
    seconds = time.perf_counter() - start
    warped = ants.apply_transforms(
        fixed_image,
        ants.image_read(str(tissue_path(moving))),
        result["fwdtransforms"],
        interpolator="genericLabel",
    )
    folding = 0.0
    if kind == "SyN":
        jacobian = ants.create_jacobian_determinant_image(fixed_image, result["fwdtransforms"][0])
        folding = 100.0 * float((jacobian.numpy() <= 0).mean())
    return {"reg_s": seconds, "folding": folding, "warped": warped.numpy()}


def run_greedy(fixed: Path, moving: Path, out: Path, threads: int) -> dict:
    """Greedy: affine NMI from the image centres, then NCC 2x2(x2) deformable; classes resliced
    with ``-ri LABEL``."""
    import picsl_greedy

    ndim = len(nib.load(fixed).shape)
    greedy = picsl_greedy.Greedy2D() if ndim == 2 else picsl_greedy.Greedy3D()
    affine, warp, warped = out / "affine.mat", out / "warp.nii.gz", out / "warped_labels.nii.gz"
    common = f"-d {ndim} -threads {threads} -seed 1"
    radius = "x".join(["2"] * ndim)
    start = time.perf_counter()
    greedy.execute(
        f"{common} -a -dof 12 -m NMI -i {fixed} {moving} -ia-image-centers -n 100x50x10 -o {affine}"
    )
    greedy.execute(
        f"{common} -m NCC {radius} -i {fixed} {moving} -it {affine} -n 100x50x10 -wp 0 -o {warp}"
    )
    seconds = time.perf_counter() - start
    greedy.execute(
        f"{common} -rf {fixed} -ri LABEL 0.2vox -rm {tissue_path(moving)} {warped} "
        f"-r {warp} {affine}"
    )
    return {"reg_s": seconds, "folding": math.nan, "warped": np.asarray(nib.load(warped).dataobj)}


def tissue_path(image: Path) -> Path:
    return image.with_name(image.name.replace(".nii.gz", "_tissue.nii.gz"))


def evaluate(method: str, fixed: Path, moving: Path, out: Path, variants, args) -> dict:
    """Run one method on one pair and score it."""
    out.mkdir(parents=True, exist_ok=True)
    if method == "header":
        import ants

        classes = ants.image_read(str(tissue_path(moving)))
        on_fixed = ants.resample_image_to_target(
            classes, ants.image_read(str(fixed)), "genericLabel"
        )
        record = {"reg_s": 0.0, "folding": 0.0, "warped": on_fixed.numpy()}
    elif method in ("ants-affine", "ants-syn"):
        record = run_ants(fixed, moving, out, "Affine" if method == "ants-affine" else "SyN")
    elif method == "greedy":
        record = run_greedy(fixed, moving, out, args.threads)
    else:
        overrides = shlex.split(args.regnet_args) + variants.get(method, [])
        record = run_regnet(fixed, moving, out, overrides, args.threads)
    fixed_classes = np.asarray(nib.load(tissue_path(fixed)).dataobj)
    scores = dice_by_class(fixed_classes, np.asarray(record.pop("warped")).astype(np.uint8))
    return {**scores, **record}


def summary(rows: list[dict], methods: list[str]) -> str:
    """Markdown: per method the mean (± standard deviation over pairs) of Dice, the classes'
    means, the mean folding, median seconds, and pairs on which it beats ANTs SyN's Dice."""
    syn = {(r["fixed"], r["moving"]): r["dice"] for r in rows if r["method"] == "ants-syn"}
    lines = [
        "| method | Dice | CSF | GM | WM | % det J <= 0 | reg s | total s | Dice > SyN's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        mine = [r for r in rows if r["method"] == method and "error" not in r]
        if not mine:
            lines.append(f"| {method} | failed |  |  |  |  |  |  |  |")
            continue
        dice = [r["dice"] for r in mine]
        cells = [f"{statistics.fmean(dice):.3f} ± {statistics.pstdev(dice):.3f}"]
        cells += [f"{statistics.fmean(r[name] for r in mine):.3f}" for name in CLASSES.values()]
        folding = [r["folding"] for r in mine if not math.isnan(r["folding"])]
        cells.append(f"{statistics.fmean(folding):.3f}" if folding else "n/a")
        cells.append(f"{statistics.median(r['reg_s'] for r in mine):.2f}")
        totals = [r["total_s"] for r in mine if "total_s" in r]
        cells.append(f"{statistics.median(totals):.2f}" if totals else "")
        better = [
            r["dice"] > syn[(r["fixed"], r["moving"])]
            for r in mine
            if (r["fixed"], r["moving"]) in syn
        ]
        cells.append(f"{sum(better)} / {len(better)}" if syn and method != "ants-syn" else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="from " + ",".join(METHODS))
    parser.add_argument(
        "--variant", action="append", default=[], help="LABEL=OVERRIDES: method regnet:LABEL"
    )
    parser.add_argument("--regnet-args", default="", help="register.py overrides, all regnet runs")
    parser.add_argument("--data", type=Path, help="antspyx source distribution's data folder")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "regnet-real-intersubject",
        help="downloaded source distribution, prepared images and results",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", choices=("slices", "brains"), default="slices")
    parser.add_argument("--subjects", help="a subset of the set's subjects, e.g. r16,r27")
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    variants = {}
    for text in args.variant:
        label, _, overrides = text.partition("=")
        variants[f"regnet:{label}"] = shlex.split(overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods += [m for m in variants if m not in methods]
    unknown = [m for m in methods if m not in METHODS and m not in variants]
    if unknown:
        parser.error(f"unknown methods {unknown}; define regnet:LABEL with --variant")
    args.work.mkdir(parents=True, exist_ok=True)
    images = args.work / args.set
    names = prepare(args.set, args.data or antspyx_data(args.work), images)
    rows = []
    start = time.perf_counter()
    subjects = [n for n in args.subjects.split(",") if n in names] if args.subjects else names
    for fixed_name in subjects:
        for moving_name in subjects:
            if fixed_name == moving_name:
                continue
            fixed, moving = images / f"{fixed_name}.nii.gz", images / f"{moving_name}.nii.gz"
            for method in methods:
                pair = f"{fixed_name}-{moving_name}"
                out = args.work / "runs" / args.set / pair / method.replace(":", "_")
                row = {"fixed": fixed_name, "moving": moving_name, "method": method}
                try:
                    row.update(evaluate(method, fixed, moving, out, variants, args))
                except (RuntimeError, OSError) as error:
                    row["error"] = str(error)
                rows.append(row)
                text = row.get("error") or f"Dice {row['dice']:.3f}  {row['reg_s']:.2f} s"
                print(f"{fixed_name} <- {moving_name}  {method:16s} {text}", flush=True)
    print()
    print(summary(rows, methods))
    print(f"\n({time.perf_counter() - start:.0f} s, {args.threads} threads)")
    if args.csv:
        keys = ["fixed", "moving", "method", "dice", *CLASSES.values()]
        keys += ["folding", "reg_s", "total_s", "error"]
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, keys)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
