"""``predict.py`` end to end with a network trained for two steps, and its bad-input handling.

The reference for the network's field on the fixed image's grid is computed independently: the
network is loaded with :meth:`RegistrationModule.from_checkpoint`, its voxel field interpolated
with SciPy at each fixed voxel's world position and turned into mm with NumPy.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates
from tiny_models import train_tiny_checkpoint
from unsafe_pickle import write_malicious_checkpoint

import regnet.cli.predict as predict_cli
from regnet.cli.predict import main
from regnet.data.preprocess import load_pair
from regnet.module import RegistrationModule

REPO = Path(__file__).resolve().parents[2]
FIXED_SHAPE = (14, 12, 10)
MOVING_SHAPE = (13, 15, 9)
FIXED_AFFINE = np.array(
    [[-1.5, 0, 0, 22.0], [0, 1.2, 0, -8.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]]
)  # LAS
MOVING_AFFINE = np.array(
    [[-1.4, 0, 0, 21.3], [0, -1.3, 0, 10.7], [0, 0, 2.1, 2.2], [0, 0, 0, 1]]
)  # LPS


def smooth_image(shape, phase: float) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.linspace(0, np.pi, n) for n in shape], indexing="ij")
    return (100 * np.sin(i + phase) * np.sin(j) * np.cos(0.5 * k) + 50).astype(np.float32)


def save(path: Path, data: np.ndarray, matrix: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, matrix), str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return train_tiny_checkpoint(tmp_path_factory.mktemp("train"))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    fixed = smooth_image(FIXED_SHAPE, 0.0)
    moving = smooth_image(MOVING_SHAPE, 0.3)
    points = np.array([[10.0, -2.0, 8.0], [14.0, 1.0, 12.0], [8.0, 3.0, 10.0]])
    for name, rows in (("fixed.csv", points), ("moving.csv", points + [0.5, -0.3, 0.2])):
        lines = ["x,y,z"] + [",".join(map(str, row)) for row in rows]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    return {
        "fixed": save(tmp_path / "fixed.nii.gz", fixed, FIXED_AFFINE),
        "moving": save(tmp_path / "moving.nii.gz", moving, MOVING_AFFINE),
        "fixed_labels": save(tmp_path / "fl.nii.gz", (fixed // 40).astype(np.int16), FIXED_AFFINE),
        "moving_labels": save(
            tmp_path / "ml.nii.gz", (moving // 40).astype(np.int16), MOVING_AFFINE
        ),
        "fixed_points": tmp_path / "fixed.csv",
        "moving_points": tmp_path / "moving.csv",
    }


def reference_disp_mm(checkpoint: Path, files: dict[str, Path]) -> np.ndarray:
    """The network's field on the fixed grid, ``(3, *FIXED_SHAPE)`` mm RAS, computed apart."""
    module = RegistrationModule.from_checkpoint(checkpoint).eval()
    item = load_pair(files["fixed"], files["moving"], ndim=3, shape=[16, 16, 16])
    with torch.no_grad():
        ddf = module(item["fixed"][None], item["moving"][None])["ddf"][0].double().numpy()
    grid_fixed, grid_moving = item["fixed_affine"].numpy(), item["moving_affine"].numpy()
    index = np.stack(np.meshgrid(*[np.arange(n) for n in FIXED_SHAPE], indexing="ij"))
    index = index.reshape(3, -1).astype(float)
    world = FIXED_AFFINE[:3, :3] @ index + FIXED_AFFINE[:3, 3:]
    grid = np.linalg.inv(grid_fixed)[:3, :3] @ world + np.linalg.inv(grid_fixed)[:3, 3:]
    u = np.stack([map_coordinates(c, grid, order=1, mode="nearest") for c in ddf])
    moved = grid_moving[:3, :3] @ (grid + u) + grid_moving[:3, 3:]
    return (moved - world).reshape(3, *FIXED_SHAPE)


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """Run ``predict.main`` in-process; returns (exit status, stderr)."""
    try:
        main(args)
        status = 0
    except SystemExit as stop:
        status = int(stop.code)
    return status, capsys.readouterr().err


def test_predict_writes_the_network_result_in_fixed_space(checkpoint, files, tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        f"ckpt={checkpoint}",
        f"pair=[{files['fixed']},{files['moving']}]",
        f"labels=[{files['fixed_labels']},{files['moving_labels']}]",
        f"landmarks=[{files['fixed_points']},{files['moving_points']}]",
        f"out={out}",
        "device=cpu",
    ]
    status, err = run_main(args, capsys)
    assert status == 0, err
    disp, affine = load_disp(out / "disp_mm.nii.gz")
    np.testing.assert_allclose(affine, FIXED_AFFINE, atol=1e-6)
    expected = reference_disp_mm(checkpoint, files)
    assert np.abs(expected).max() > 0.5  # the implicit centre offset and the network's field
    np.testing.assert_allclose(disp, expected, atol=1e-4)
    warped = nib.load(str(out / "warped.nii.gz"))
    assert warped.shape == FIXED_SHAPE
    np.testing.assert_allclose(warped.affine, FIXED_AFFINE, atol=1e-6)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in FIXED_SHAPE], indexing="ij"))
    world = np.einsum("ij,j...->i...", FIXED_AFFINE[:3, :3], index)
    world = world + FIXED_AFFINE[:3, 3, None, None, None] + expected
    inverse = np.linalg.inv(MOVING_AFFINE)
    coords = np.einsum("ij,j...->i...", inverse[:3, :3], world) + inverse[:3, 3, None, None, None]
    moving = nib.load(str(files["moving"])).get_fdata()
    reference = map_coordinates(moving, coords.reshape(3, -1), order=1, mode="grid-constant")
    np.testing.assert_allclose(warped.get_fdata().reshape(-1), reference, atol=1e-2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tre_mm"]["n"] == 3 and metrics["dice_mean"] is not None
    assert metrics["info"]["method"] == f"ckpt:{checkpoint}"
    assert (out / "itk_warp.nii.gz").is_file() and (out / "overview.png").is_file()


@pytest.mark.parametrize("transform", ["svf", "ddf"])
def test_refinement_starts_from_the_network_and_improves_similarity(
    checkpoint, files, tmp_path, capsys, transform
):
    out = tmp_path / "refined"
    args = [f"ckpt={checkpoint}", f"pair=[{files['fixed']},{files['moving']}]", "device=cpu"]
    refine_args = ["refine.steps=20", f"refine.transform={transform}", "refine.levels=1"]
    status, err = run_main([*args, *refine_args, f"out={out}"], capsys)
    assert status == 0, err
    status, err = run_main([*args, f"out={tmp_path / 'plain'}"], capsys)
    assert status == 0, err
    fixed = nib.load(str(files["fixed"])).get_fdata()
    plain = nib.load(str(tmp_path / "plain" / "warped.nii.gz")).get_fdata()
    refined = nib.load(str(out / "warped.nii.gz")).get_fdata()
    assert np.mean((refined - fixed) ** 2) < np.mean((plain - fixed) ** 2)
    disp, _ = load_disp(out / "disp_mm.nii.gz")
    assert np.abs(disp - reference_disp_mm(checkpoint, files)).max() > 1e-3
    assert json.loads((out / "metrics.json").read_text())["info"]["refine_steps"] == 20


def load_disp(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.moveaxis(image.get_fdata()[:, :, :, 0, :], -1, 0), image.affine


def test_pairs_list_writes_one_folder_per_row(checkpoint, files, tmp_path, capsys):
    listing = tmp_path / "pairs.csv"
    listing.write_text("fixed,moving\nfixed.nii.gz,moving.nii.gz\nmoving.nii.gz,fixed.nii.gz\n")
    out = tmp_path / "many"
    status, err = run_main([f"ckpt={checkpoint}", f"pairs={listing}", f"out={out}"], capsys)
    assert status == 0, err
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["001_moving_to_fixed", "002_fixed_to_moving", "manifest", "summary.csv"]
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["pair"] for row in rows] == folders[:2]
    for row, folder in zip(rows, folders[:2], strict=True):
        metrics = json.loads((out / folder / "metrics.json").read_text())
        assert float(row["sdlogj"]) == pytest.approx(metrics["sdlogj"], rel=1e-12)
    second = nib.load(str(out / folders[1] / "warped.nii.gz"))
    assert second.shape == MOVING_SHAPE
    np.testing.assert_allclose(second.affine, MOVING_AFFINE, atol=1e-6)


def bad_case(case: str, files: dict[str, Path], checkpoint: Path, tmp: Path) -> tuple[list, str]:
    """Arguments replacing the good ones for ``case`` and the file the message must name."""
    fixed, moving = files["fixed"], files["moving"]
    if case == "missing":
        return [f"pair=[{tmp / 'nope.nii.gz'},{moving}]"], f"{tmp / 'nope.nii.gz'}: file not found"
    if case == "not_an_image":
        path = tmp / "notes.nii.gz"
        path.write_text("hello")
        return [f"pair=[{fixed},{path}]"], f"{path}: not a readable image"
    if case == "4d":
        path = save(tmp / "four.nii.gz", np.ones((*MOVING_SHAPE, 2), np.float32), MOVING_AFFINE)
        return [f"pair=[{fixed},{path}]"], f"{path}: is 4D"
    if case == "nan":
        data = np.ones(MOVING_SHAPE, np.float32)
        data[3, 4, 5] = np.inf
        path = save(tmp / "nan.nii.gz", data, MOVING_AFFINE)
        return [f"pair=[{fixed},{path}]"], f"{path}: contains NaN or Inf"
    if case == "label_grid":
        labels = [files["fixed_labels"], files["fixed_labels"]]
        return [f"labels=[{labels[0]},{labels[1]}]"], f"{labels[1]}: label grid"
    if case in ("other_model", "version"):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if case == "other_model":
            state["hyper_parameters"] = {"lr": 0.1}
            problem = "not a regnet checkpoint"
        else:
            state["regnet_version"] = "7.0.0"
            problem = "written by regnet 7.0.0, incompatible"
        path = tmp / f"{case}.ckpt"
        torch.save(state, path)
        return [f"ckpt={path}"], f"{path}: {problem}"
    if case == "not_a_checkpoint":
        path = tmp / "text.ckpt"
        path.write_text("weights")
        return [f"ckpt={path}"], f"{path}: not a PyTorch checkpoint"
    if case == "code_in_checkpoint":
        path = write_malicious_checkpoint(tmp / "sent.ckpt", tmp.parent / f"{tmp.name}-ran")
        return [f"ckpt={path}"], f"{path}: refused: reading it would run code stored in the file"
    if case == "no_ckpt":
        return ["ckpt=null"], "ckpt: missing"
    if case == "refine_transform":
        return ["refine.steps=2", "refine.transform=bspline"], "refine.transform: must be svf"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not_an_image",
        "4d",
        "nan",
        "label_grid",
        "other_model",
        "version",
        "not_a_checkpoint",
        "code_in_checkpoint",
        "no_ckpt",
        "refine_transform",
    ],
)
def test_bad_input_gives_one_line_and_writes_nothing(case, checkpoint, files, tmp_path, capsys):
    out = tmp_path / "out"
    replaced, message = bad_case(case, files, checkpoint, tmp_path)
    args = {
        "ckpt": f"ckpt={checkpoint}",
        "pair": f"pair=[{files['fixed']},{files['moving']}]",
        "labels": f"labels=[{files['fixed_labels']},{files['moving_labels']}]",
    }
    args.update({a.split("=", 1)[0]: a for a in replaced})
    before = sorted(tmp_path.iterdir())
    status, err = run_main([*args.values(), f"out={out}", "device=cpu"], capsys)
    assert status == 2
    assert err == f"error: {err[len('error: ') :].strip()}\n" and err.count("\n") == 1
    assert err.startswith(f"error: {message}"), err
    assert sorted(tmp_path.iterdir()) == before  # no output folder, no staging left behind


def test_trained_checkpoint_reads_without_unpickling_code(checkpoint):
    """A checkpoint of a real training run holds only tensors and plain containers; every
    prediction in this file loads it that way (:func:`regnet.checkpoint.read_checkpoint`)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = state["hyper_parameters"]["config"]
    assert type(config) is dict and type(config["model"]["enc_channels"]) is list
    assert state["hyper_parameters"]["loss"] == config["loss"]
    assert state["optimizer_states"] and state["loops"]


def test_code_in_a_sent_checkpoint_never_runs(files, tmp_path, capsys):
    marker = tmp_path / "ran"
    path = write_malicious_checkpoint(tmp_path / "sent.ckpt", marker)
    out = tmp_path / "out"
    status, err = run_main(
        [f"ckpt={path}", f"pair=[{files['fixed']},{files['moving']}]", f"out={out}"], capsys
    )
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {path}: refused: reading it would run code")
    assert not marker.exists() and not out.exists()


def test_existing_output_is_refused_untouched_unless_overwrite(checkpoint, files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    args = [f"ckpt={checkpoint}", f"pair=[{files['fixed']},{files['moving']}]", f"out={out}"]
    # the real entry script: one line on stderr, exit status 2, no traceback
    command = [sys.executable, str(REPO / "predict.py"), *args]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 2
    assert run.stderr == (
        f"error: {out}: output folder already holds results; pass overwrite=true to replace them\n"
    )
    assert [p.name for p in out.iterdir()] == ["metrics.json"]
    assert (out / "metrics.json").read_text() == "{}"
    status, err = run_main([*args, "overwrite=true", "overview=false"], capsys)
    assert status == 0, err
    assert json.loads((out / "metrics.json").read_text())["inputs"]["fixed"] == str(files["fixed"])


def test_a_refinement_worse_than_the_network_is_reported_and_not_returned(
    checkpoint, files, tmp_path, capsys, monkeypatch
):
    def spoiling(network_ddf, *args, **kwargs):  # a refinement that ends 3 voxels off
        return network_ddf + torch.tensor([3.0, 0.0, 0.0]).view(1, 3, 1, 1, 1)

    monkeypatch.setattr(predict_cli, "refine", spoiling)
    out = tmp_path / "out"
    args = [f"ckpt={checkpoint}", f"pair=[{files['fixed']},{files['moving']}]", "device=cpu"]
    status, err = run_main([*args, "refine.steps=5", f"out={out}"], capsys)
    assert status == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ")
    assert "the network alignment is kept" in lines[0]
    disp, _ = load_disp(out / "disp_mm.nii.gz")
    np.testing.assert_allclose(disp, reference_disp_mm(checkpoint, files), atol=1e-4)
    check = json.loads((out / "metrics.json").read_text())["info"]["start_check"]
    assert check["kept"] == "network"
    assert check["scores"]["refined"]["nmi"] < check["scores"]["network"]["nmi"]


@pytest.mark.parametrize("start_check", [True, False])
def test_a_network_field_worse_than_the_headers_is_reported_and_not_returned(
    checkpoint, files, tmp_path, capsys, monkeypatch, start_check
):
    def spoiled(*args, **kwargs):  # the network places the moving image 3 voxels off
        return torch.tensor([3.0, 0.0, 0.0]).view(1, 3, 1, 1, 1).expand(1, 3, 16, 16, 16)

    monkeypatch.setattr(predict_cli, "run_network", spoiled)
    out = tmp_path / "out"
    same = files["fixed"]  # moving = fixed: the headers align the pair exactly
    args = [f"ckpt={checkpoint}", f"pair=[{files['fixed']},{same}]", "device=cpu"]
    status, err = run_main([*args, f"start_check={start_check}", f"out={out}"], capsys)
    assert status == 0, err
    disp, _ = load_disp(out / "disp_mm.nii.gz")
    info = json.loads((out / "metrics.json").read_text())["info"]
    if start_check:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("warning: ")
        assert "the header alignment is kept" in lines[0]
        assert np.abs(disp).max() < 1e-4
        assert info["start_check"]["kept"] == "header"
        scores = info["start_check"]["scores"]
        assert scores["network"]["nmi"] < scores["header"]["nmi"]
    else:
        assert err == "" and "start_check" not in info
        assert np.abs(disp).max() > 1.0  # the spoiled field, 3 voxels of the network grid


@pytest.mark.parametrize("ndim", [2, 3])
def test_header_ddf_carries_fixed_grid_voxels_to_the_moving_grid_voxels_of_the_same_point(ndim):
    """Fixed grid 2 mm, moving grid 1 mm shifted by 3 mm along x: fixed voxel x is world
    2x (+origin), which the moving grid holds at voxel 2x + 3 (+ its origin offset)."""
    from regnet.cli.predict import header_ddf

    fixed_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    moving_affine = np.eye(4)
    moving_affine[0, 3] = -3.0
    shape = (5, 4, 3)[:ndim]
    item = {
        "fixed": torch.zeros(1, *shape),
        "fixed_affine": torch.from_numpy(fixed_affine),
        "moving_affine": torch.from_numpy(moving_affine),
    }
    ddf = header_ddf(item, torch.device("cpu"))
    assert ddf.shape == (1, ndim, *shape)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(float)
    expected = grid.copy()  # moving voxel 2x + (3, 0, 0) minus fixed voxel x
    expected[0] += 3.0
    np.testing.assert_allclose(ddf[0].numpy(), expected, atol=1e-5)
