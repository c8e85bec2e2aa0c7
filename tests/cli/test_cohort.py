"""Lists of pairs through :mod:`regnet.cli.cohort`: two processes give one process's numbers, a
rerun resumes, failures are listed (or stop the run with ``fail_fast``), a pair never remains
half-written, changed settings redo pairs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import regnet.outputs
from regnet.cli.cohort import RankSampler
from regnet.cli.evaluate import main as evaluate_main
from regnet.cli.register import main as register_main

REPO = Path(__file__).resolve().parents[2]
SHAPE = (12, 11, 10)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
QUICK = ["levels=1", "iterations=[5]", "affine_iterations=[5]", "spacing=3", "init=identity"]
"""register.py settings that take a fraction of a second on these images (and keep their result
whatever its score: ``start_check=false``, so stderr holds only failures)."""


def image(phase: float) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.linspace(0, np.pi, n) for n in SHAPE], indexing="ij")
    return (100 * np.sin(i + phase) * np.sin(j) * np.cos(0.5 * k) + 50).astype(np.float32)


@pytest.fixture
def listing(tmp_path: Path) -> Path:
    """Four pairs: fixed ``i0``, moving ``i1``..``i4`` (the pattern shifted further each time),
    with label maps."""
    rows = ["fixed,moving,fixed_label,moving_label"]
    for n in range(5):
        data = image(0.12 * n)
        nib.save(nib.Nifti1Image(data, AFFINE), str(tmp_path / f"i{n}.nii.gz"))
        labels = (data // 40).astype(np.int16)
        nib.save(nib.Nifti1Image(labels, AFFINE), str(tmp_path / f"l{n}.nii.gz"))
        if n:
            rows.append(f"i0.nii.gz,i{n}.nii.gz,l0.nii.gz,l{n}.nii.gz")
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def manifest_lines(out: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted((out / "manifest").glob("rank*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def run_main(entry, args: list[str], capsys) -> tuple[int, str, str]:
    """Run a command's ``main`` in this process: (exit status, stdout, stderr)."""
    try:
        entry(args)
        status = 0
    except SystemExit as stop:
        status = int(stop.code)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def register_list(listing: Path, out: Path, capsys, *extra: str) -> tuple[int, str, str]:
    """``register.py pairs=`` in this process with quick settings."""
    args = [f"pairs={listing}", f"out={out}", "device=cpu", "transform=affine", *QUICK]
    return run_main(register_main, [*args, "overview=false", "start_check=false", *extra], capsys)


def computed(stdout: str) -> list[str]:
    """Pair folders named by the per-pair lines ``<out>/<pair>: ...``."""
    return [Path(line.split(":")[0]).name for line in stdout.splitlines() if "folding" in line]


@pytest.mark.parametrize(("length", "world"), [(7, 3), (4, 2), (1, 2)])
def test_ranks_take_disjoint_pairs_without_padding(length, world):
    taken = [list(RankSampler(length, rank, world, lambda: False)) for rank in range(world)]
    assert sorted(i for indices in taken for i in indices) == list(range(length))
    assert [len(RankSampler(length, r, world, lambda: False)) for r in range(world)] == [
        len(t) for t in taken
    ]


def test_two_processes_give_the_numbers_of_one(listing, tmp_path, capsys):
    settings = [
        f"pairs={listing}",
        "methods=[identity,register:affine]",
        "register={levels:1,iterations:[5],affine_iterations:[5],spacing:3,init:identity,"
        "start_check:false}",
        "device=cpu",
    ]
    status, _, err = run_main(evaluate_main, [*settings, f"out={tmp_path / 'one'}"], capsys)
    assert status == 0, err
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(REPO / "evaluate.py"), *settings, f"out={tmp_path / 'two'}"]
    run = subprocess.run(
        [*command, "devices=2"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "on 2 process(es)" in run.stdout
    one, two = (read_rows(tmp_path / name / "per_pair.csv") for name in ("one", "two"))
    assert len(one) == 8 and {r["pair"] for r in one} == {f"00{n}_i{n}_to_i0" for n in (1, 2, 3, 4)}
    for a, b in zip(one, two, strict=True):
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    affine = [r for r in one if r["method"] == "register:affine"]
    assert len({r["dice_mean"] for r in affine}) == 4  # four different results, compared above
    summaries = [read_rows(tmp_path / name / "summary.csv") for name in ("one", "two")]
    for a, b in zip(*summaries, strict=True):
        assert {k: v for k, v in a.items() if "seconds" not in k} == {
            k: v for k, v in b.items() if "seconds" not in k
        }
    ranks = {
        rank: {line["pair"] for line in manifest_lines(tmp_path / "two") if line["rank"] == rank}
        for rank in (0, 1)
    }
    assert ranks == {0: {"001_i1_to_i0", "003_i3_to_i0"}, 1: {"002_i2_to_i0", "004_i4_to_i0"}}


def test_a_rerun_computes_only_what_is_missing(listing, tmp_path, capsys):
    out = tmp_path / "out"
    status, stdout, err = register_list(listing, out, capsys, "num_workers=1")
    assert status == 0, err
    assert computed(stdout) == [f"00{n}_i{n}_to_i0" for n in (1, 2, 3, 4)]
    stamps = {p.name: (p / "metrics.json").stat().st_mtime_ns for p in out.glob("00*")}
    # interrupted after three pairs: the third pair's folder and manifest line are gone
    lines = (out / "manifest" / "rank0.jsonl").read_text().splitlines()
    (out / "manifest" / "rank0.jsonl").write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    for file in (out / "003_i3_to_i0").iterdir():
        file.unlink()
    (out / "003_i3_to_i0").rmdir()
    status, stdout, err = register_list(listing, out, capsys, "num_workers=1")
    assert status == 0, err
    assert computed(stdout) == ["003_i3_to_i0"]
    assert "1 pairs run" in stdout and "3 done before (skipped)" in stdout
    for name, stamp in stamps.items():
        changed = (out / name / "metrics.json").stat().st_mtime_ns != stamp
        assert changed == (name == "003_i3_to_i0")
    rows = read_rows(out / "summary.csv")
    assert [r["pair"] for r in rows] == sorted(stamps)
    metrics = json.loads((out / "003_i3_to_i0" / "metrics.json").read_text())
    assert float(rows[2]["dice_mean"]) == pytest.approx(metrics["dice_mean"], rel=1e-12)
    # a third run finds everything done
    status, stdout, err = register_list(listing, out, capsys, "num_workers=1")
    assert status == 0 and computed(stdout) == [] and "4 done before" in stdout


def test_changed_settings_redo_pairs_and_overwrite_redoes_all(listing, tmp_path, capsys):
    out = tmp_path / "out"
    assert register_list(listing, out, capsys)[0] == 0
    # where and how it runs is not part of a result
    status, stdout, _ = register_list(listing, out, capsys, "num_workers=1", "fail_fast=true")
    assert status == 0 and computed(stdout) == []
    status, stdout, _ = register_list(listing, out, capsys, "smoothing=2.0")
    assert status == 0 and len(computed(stdout)) == 4
    status, stdout, _ = register_list(listing, out, capsys, "smoothing=2.0")
    assert status == 0 and computed(stdout) == []
    status, stdout, _ = register_list(listing, out, capsys, "smoothing=2.0", "overwrite=true")
    assert status == 0 and len(computed(stdout)) == 4
    configs = {line["config"] for line in manifest_lines(out)}
    assert len(configs) == 8  # four pairs under two settings


def test_a_bad_row_is_listed_and_the_others_go_on(listing, tmp_path, capsys):
    (tmp_path / "i2.nii.gz").write_text("not an image")
    out = tmp_path / "out"
    status, stdout, err = register_list(listing, out, capsys)
    assert status == 2
    assert computed(stdout) == ["001_i1_to_i0", "003_i3_to_i0", "004_i4_to_i0"]
    failed, final = err.splitlines()
    problem = f"{tmp_path / 'i2.nii.gz'}: not a readable image"
    assert failed.startswith(f"failed: 002_i2_to_i0 register:affine: {problem}")
    assert final.startswith(f"error: {out / 'summary.csv'}: 1 of 4 results failed")
    rows = read_rows(out / "summary.csv")
    assert [bool(r["error"]) for r in rows] == [False, True, False, False]
    assert rows[1]["error"].startswith(problem) and rows[1]["dice_mean"] == ""
    assert all(float(r["dice_mean"]) > 0.5 for r in rows if not r["error"])
    assert not (out / "002_i2_to_i0").exists()
    # with fail_fast the run stops at it, with its one line
    stopped = tmp_path / "stopped"
    status, stdout, err = register_list(listing, stopped, capsys, "fail_fast=true")
    assert status == 2 and err.startswith(f"error: {problem}") and err.count("\n") == 1
    assert computed(stdout) == ["001_i1_to_i0"] and not (stopped / "summary.csv").exists()
    # once the file is repaired, a rerun registers the failed pair only
    nib.save(nib.Nifti1Image(image(0.24), AFFINE), str(tmp_path / "i2.nii.gz"))
    status, stdout, err = register_list(listing, out, capsys)
    assert status == 0, err
    assert computed(stdout) == ["002_i2_to_i0"]
    assert not any(r["error"] for r in read_rows(out / "summary.csv"))


def test_a_pair_that_fails_while_writing_leaves_nothing(listing, tmp_path, capsys, monkeypatch):
    real = regnet.outputs.save_like_fixed

    def failing(path, data, fixed, *level):
        if "i2_to_i0" in str(path) and Path(path).name == "jacdet.nii.gz":
            raise OSError("disk full")
        return real(path, data, fixed, *level)

    monkeypatch.setattr(regnet.outputs, "save_like_fixed", failing)
    out = tmp_path / "out"
    status, stdout, err = register_list(listing, out, capsys)
    assert status == 2
    assert "OSError: disk full" in err and "Traceback" in err  # not bad input: its traceback
    assert computed(stdout) == ["001_i1_to_i0", "003_i3_to_i0", "004_i4_to_i0"]
    assert sorted(p.name for p in out.iterdir()) == [
        "001_i1_to_i0",
        "003_i3_to_i0",
        "004_i4_to_i0",
        "manifest",
        "summary.csv",
    ]  # no 002 folder, no staging folder left
    assert sorted(p.name for p in (out / "001_i1_to_i0").iterdir()) == [
        "affine.tfm",
        "disp_mm.nii.gz",
        "itk_warp.nii.gz",
        "jacdet.nii.gz",
        "metrics.json",
        "warped.nii.gz",
        "warped_labels.nii.gz",
    ]
