"""``evaluate.py`` / ``regnet-evaluate``: compare registration methods over many pairs.

Examples::

    python evaluate.py methods=[ckpt:model.ckpt,identity] pairs=list.csv out=eval
    python evaluate.py methods=[ckpt:model.ckpt] learn2reg=OASIS/OASIS_dataset.json split=val
    python evaluate.py methods=[ckpt:model.ckpt,register:svf] pairs=list.csv devices=4 out=eval

Methods: ``identity`` (no transform: the pair as it lies in world space), ``ckpt:PATH`` (a trained
network, as ``predict.py`` runs it, with ``refine.steps`` of instance optimisation),
``register:<rigid|affine|bspline|ddf|svf>`` (classical optimisation as ``register.py`` runs it,
with ``configs/register.yaml`` changed by the ``register`` entries; landmarks are not used for
optimising). Every method is evaluated on the fixed image's own grid with the original files
(:mod:`regnet.pipeline`).

Outputs in ``out``: ``per_pair.csv`` (one row per method and pair: mean Dice, mean HD95 (mm),
mean TRE (mm), % folding, SDlogJ, seconds), ``per_pair.json`` (every metric, per label),
``summary.csv`` and ``summary.md`` (mean ± std over pairs per method; also printed), and with
``save_outputs=true`` each registration's files under ``<method>/<pair>/``. With
``submission=DIR`` (one method) the fields also go to a Learn2Reg submission folder, and with
``learn2reg=`` that folder is scored as the challenge scores it (``learn2reg.json``, and a table in
``summary.md``; :mod:`regnet.cli.submission`).

The pairs run in Lightning's prediction loop (:mod:`regnet.cli.cohort`): ``devices=N``
(``num_nodes``, ``strategy``) processes share them, ``num_workers`` read them. Each (pair, method)
is recorded in ``out/manifest/`` when done, its saved files complete (staged); a rerun registers
only what is missing, failed or computed under other settings (a method added to ``methods``
runs alone), ``overwrite=true`` everything. The tables are rewritten (each file whole) at the end
from the manifest; a pair that fails is listed in them with its error and the others go on (exit
status 2 at the end), unless ``fail_fast=true`` stops the run at it. An ``out`` that holds files
but no manifest is refused unless ``overwrite=true``. The submission folder is written at once
(staged) by one process, so with ``submission=`` every pair is registered again and
``devices=1``.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from regnet.cli.cohort import (
    COLUMNS,
    Cohort,
    check_cohort_out,
    result_row,
    rows_csv,
    run_cohort,
    settings_of,
    write_text_atomic,
)
from regnet.cli.common import (
    InputError,
    PairSpec,
    compose_config,
    pair_name,
    pairs_from_list,
    resolve_device,
    run_command,
)
from regnet.cli.predict import apply_preprocess_overrides, check_refine_settings, predict_pair
from regnet.cli.register import register_pair
from regnet.cli.register_settings import check_settings as check_register_settings
from regnet.cli.submission import (
    check_submission,
    learn2reg_config,
    score_submission,
    submission_folder,
    write_submission_field,
)
from regnet.data.layouts import Learn2RegDataset
from regnet.outputs import write_registration
from regnet.pipeline import (
    GridField,
    PairInputs,
    RegistrationResult,
    Stopwatch,
    complete_registration,
    load_network,
    registration_metrics,
)


@dataclass
class Method:
    """A named way to register a pair: ``run(inputs) -> RegistrationResult``."""

    name: str
    run: Callable[[PairInputs], RegistrationResult]


def identity_result(inputs: PairInputs) -> RegistrationResult:
    """The identity transform (zero field on the fixed grid)."""
    watch = Stopwatch()
    field = GridField.zeros(inputs.fixed.shape, inputs.fixed.affine)
    return complete_registration(inputs, field, watch.seconds(), method="identity")


def register_settings(transform: str, cfg: DictConfig) -> DictConfig:
    """``configs/register.yaml`` with ``transform`` and the entries of ``cfg.register`` merged
    in (e.g. ``register={levels:2,spacing:3}``)."""
    settings = compose_config("register", [f"transform={transform}"])
    extra = cfg.get("register") or {}
    unknown = sorted(set(extra) - set(settings))
    if unknown:
        raise InputError(f"register.{unknown[0]}", "is not a setting of configs/register.yaml")
    settings = OmegaConf.merge(settings, extra)
    check_register_settings(settings)
    return settings


def register_result(
    inputs: PairInputs, device: torch.device, settings: DictConfig
) -> RegistrationResult:
    """Classical registration (:func:`regnet.cli.register.register_pair`). Landmarks are held
    back from the optimisation (they are for evaluation) and the TRE is measured with the
    result's field on the fixed grid."""
    blind = replace(inputs, fixed_landmarks=None, moving_landmarks=None, landmark_paths=None)
    result = register_pair(blind, None, device, settings)
    result.metrics.update(
        {
            key: value
            for key, value in registration_metrics(
                inputs, result.field, result.warped_labels, result.field
            ).items()
            if key == "tre_mm"
        }
    )
    return result


def build_methods(cfg: DictConfig, device: torch.device) -> list[Method]:
    """Parse ``methods`` (``identity``, ``ckpt:PATH``, ``register:<transform>``); checkpoints are
    loaded and settings checked here, so that a bad one fails before any pair is registered.

    Raises:
        InputError: for an unknown or duplicate method.
    """
    specs = cfg.methods
    specs = [specs] if isinstance(specs, str) else list(specs or [])
    if not specs:
        raise InputError("methods", "empty; e.g. methods=[ckpt:model.ckpt,identity]")
    methods = []
    for spec in map(str, specs):
        kind, _, argument = spec.partition(":")
        if kind == "identity" and not argument:
            methods.append(Method("identity", identity_result))
        elif kind == "register" and argument:
            settings = register_settings(argument, cfg)
            methods.append(
                Method(spec, lambda inputs, c=settings: register_result(inputs, device, c))
            )
        elif kind == "ckpt" and argument:
            network = apply_preprocess_overrides(load_network(argument, device), cfg)
            methods.append(
                Method(spec, lambda inputs, n=network: predict_pair(n, inputs, device, cfg))
            )
        else:
            raise InputError(
                f"methods: {spec}", "expected identity, ckpt:PATH or register:<transform>"
            )
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise InputError("methods", f"lists a method twice: {names}")
    return methods


def learn2reg_pairs(dataset_json: str | Path, split: str) -> list[PairSpec]:
    """Pairs of a Learn2Reg split (:class:`regnet.data.layouts.Learn2RegDataset`): images,
    labels where every subject has them, keypoints (as RAS mm) where every subject has them."""
    dataset = Learn2RegDataset(dataset_json, split=split, ndim=3)
    specs = []
    for number, (f, m) in enumerate(dataset.pairs, start=1):
        fixed, moving = dataset.subjects[f], dataset.subjects[m]
        labels = landmarks = None
        if "label" in fixed and "label" in moving:
            labels = (Path(fixed["label"]), Path(moving["label"]))
        if "landmarks" in fixed and "landmarks" in moving:
            landmarks = (fixed["landmarks"].numpy(), moving["landmarks"].numpy())
        image_f, image_m = Path(fixed["image"]), Path(moving["image"])
        name = pair_name(number, image_f, image_m)
        specs.append(PairSpec(name, image_f, image_m, labels, landmarks))
    return specs


def evaluation_pairs(cfg: DictConfig) -> list[PairSpec]:
    """The pairs of ``pairs=LIST`` or ``learn2reg=dataset.json split=...``."""
    if (cfg.pairs is None) == (cfg.learn2reg is None):
        raise InputError("pairs/learn2reg", "give exactly one of pairs=LIST or learn2reg=JSON")
    if cfg.pairs is not None:
        return pairs_from_list(cfg.pairs)
    if cfg.split not in ("val", "test"):
        raise InputError(f"split={cfg.split}", "expected val or test")
    return learn2reg_pairs(cfg.learn2reg, str(cfg.split))


def summarise(rows: Sequence[dict], methods: Sequence[str]) -> list[dict]:
    """Per method and column: mean, std (population) and count over pairs with a value."""
    summary = []
    for method in methods:
        entry: dict = {"method": method}
        for column in COLUMNS:
            values = [r[column] for r in rows if r["method"] == method and r[column] is not None]
            values = np.asarray(values, np.float64)
            entry[column] = (
                (float(values.mean()), float(values.std()), len(values))
                if len(values)
                else (None, None, 0)
            )
        summary.append(entry)
    return summary


def summary_markdown(summary: Sequence[dict]) -> str:
    """The summary as a Markdown table of ``mean ± std`` (``n`` pairs where it differs)."""
    lines = [
        "| method | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for entry in summary:
        cells = []
        for column in COLUMNS:
            mean, std, n = entry[column]
            cells.append("–" if mean is None else f"{mean:.4g} ± {std:.2g} (n={n})")
        lines.append(f"| {entry['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_csv(summary: Sequence[dict]) -> str:
    """The summary as CSV: ``method`` then ``<column>_mean``, ``<column>_std``, ``<column>_n``."""
    buffer = io.StringIO()
    names = ["method"] + [f"{c}_{s}" for c in COLUMNS for s in ("mean", "std", "n")]
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for entry in summary:
        cells = [entry["method"]]
        for column in COLUMNS:
            mean, std, n = entry[column]
            cells += ["" if mean is None else repr(mean), "" if std is None else repr(std), n]
        writer.writerow(cells)
    return buffer.getvalue()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "method"


def failures_markdown(failures: Sequence[dict]) -> str:
    """The failed (pair, method) units as a Markdown list (empty text when none failed)."""
    if not failures:
        return ""
    lines = [f"- {r['pair']} {r['method']}: {r['error']}" for r in failures]
    return f"\nFailed ({len(failures)}):\n\n" + "\n".join(lines) + "\n"


def evaluate(cfg: DictConfig) -> Path:
    """Run ``evaluate`` for a composed ``configs/evaluate.yaml``; returns the output folder.

    The pairs go through :mod:`regnet.cli.cohort` (ranks, resume, failures); global rank 0
    writes the tables from the manifest. Methods are built here first, so that a bad one stops
    the run before any pair.
    """
    device = resolve_device(cfg.device)
    check_refine_settings(cfg)
    specs = evaluation_pairs(cfg)
    scoring = None
    if cfg.submission is not None:
        check_submission(cfg, specs)
        if cfg.devices != 1 or cfg.num_nodes != 1:
            raise InputError("submission", "is written at once by one process: devices=1")
        scoring = learn2reg_config(cfg)
    out = Path(cfg.out)
    check_cohort_out(out, bool(cfg.overwrite))

    @functools.cache
    def methods_on(rank_device: torch.device) -> dict[str, Method]:
        return {method.name: method for method in build_methods(cfg, rank_device)}

    names = list(methods_on(device))
    with submission_folder(cfg) as submission:

        def run(method: str, inputs: PairInputs, rank_device: torch.device) -> RegistrationResult:
            return methods_on(rank_device)[method].run(inputs)

        def write(method: str, spec: PairSpec, inputs: PairInputs, result) -> str:
            if cfg.save_outputs:
                target = out / _slug(method) / spec.name
                write_registration(target, inputs, result, overwrite=True)
            if submission is not None:
                write_submission_field(submission, inputs, result)
            return f"{method} {spec.name}: " + _brief(result_row(method, spec, result.metrics))

        cohort = Cohort(specs, names, out, settings_of(cfg), run, write)
        # a submission folder is written at once: every pair is registered again for it
        report = run_cohort(cohort, cfg, redo=bool(cfg.overwrite) or submission is not None)
        if report is None:
            return out
        write_text_atomic(out / "per_pair.csv", rows_csv(report.rows))
        records = [
            {"method": r["method"], "pair": r["pair"], **(r["metrics"] or {"error": r["error"]})}
            for r in report.records
        ]
        write_text_atomic(out / "per_pair.json", json.dumps(records, indent=2) + "\n")
        summary = summarise(report.rows, names)
        write_text_atomic(out / "summary.csv", summary_csv(summary))
        markdown = summary_markdown(summary) + failures_markdown(report.failures)
        if scoring is not None and not report.failures:
            report_path = out / "learn2reg.json"
            markdown += "\n" + score_submission(submission, cfg, scoring, report_path)
        write_text_atomic(out / "summary.md", markdown)
        print(markdown, end="")
        report.conclude(out / "summary.md")  # failures: the submission folder is not kept
    return out


def _brief(row: dict) -> str:
    return ", ".join(f"{c} {row[c]:.4g}" for c in COLUMNS if row[c] is not None)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: ``regnet-evaluate [key=value ...]`` (Hydra override syntax)."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    run_command(lambda: evaluate(compose_config("evaluate", overrides)))


if __name__ == "__main__":
    main()
