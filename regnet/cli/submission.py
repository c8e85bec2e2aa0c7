"""``submission=DIR`` of ``evaluate.py`` and ``predict.py``: a Learn2Reg submission folder.

Every registered pair's field is written to ``DIR`` as the challenge names and reads it
(:mod:`regnet.learn2reg`: ``disp_<fixed>_<moving>.nii.gz``, voxels on the fixed grid, backward).
The folder is staged like every regnet output (complete or not at all; an ``DIR`` that already
holds files is refused unless ``overwrite=true``). With ``learn2reg=<task>_dataset.json``,
``evaluate.py`` then scores the folder as the challenge's evaluation does, with the task's
``learn2reg_config`` (a challenge ``evaluation_config.json``) or, without one, the configuration
:meth:`regnet.learn2reg.EvaluationConfig.from_dataset` derives.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from regnet.cli.common import InputError, PairSpec
from regnet.learn2reg import (
    EvaluationConfig,
    aggregates_markdown,
    case_key,
    evaluate_submission,
    submission_name,
    voxel_displacement,
    write_displacement,
)
from regnet.outputs import staged_output
from regnet.pipeline import PairInputs, RegistrationResult


def check_submission(cfg: DictConfig, specs: Sequence[PairSpec]) -> None:
    """Reject before any work: a pair whose images are not Learn2Reg-named, two pairs with one
    file name, and (``evaluate.py``) more than one method or ``submission`` equal to ``out``."""
    methods = cfg.get("methods")
    if methods is not None and not isinstance(methods, str) and len(methods) != 1:
        raise InputError("submission", "holds the fields of one method; give exactly one")
    if methods is not None and Path(cfg.submission).absolute() == Path(cfg.out).absolute():
        raise InputError(f"submission={cfg.submission}", "must be another folder than out")
    names = [submission_name(spec.fixed, spec.moving) for spec in specs]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise InputError("submission", f"two pairs would both be written as {twice}")


def learn2reg_config(cfg: DictConfig) -> EvaluationConfig | None:
    """The evaluation configuration for ``learn2reg=`` runs (``None`` otherwise); its pairs must
    be among the split's pairs."""
    if cfg.get("learn2reg") is None:
        if cfg.get("learn2reg_config") is not None:
            raise InputError("learn2reg_config", "scores a learn2reg= split; give learn2reg=JSON")
        return None
    if cfg.get("learn2reg_config") is not None:
        config = EvaluationConfig.from_file(cfg.learn2reg_config)
    else:
        config = EvaluationConfig.from_dataset(cfg.learn2reg, str(cfg.split))
    split = EvaluationConfig.from_dataset(cfg.learn2reg, str(cfg.split))
    missing = {case_key(*p) for p in config.pairs} - {case_key(*p) for p in split.pairs}
    if missing:
        raise InputError(
            f"learn2reg_config={cfg.learn2reg_config}",
            f"scores pairs that split={cfg.split} does not register: {sorted(missing)[0]}",
        )
    return config


@contextmanager
def submission_folder(cfg: DictConfig) -> Iterator[Path | None]:
    """The staging folder of ``submission=DIR`` (``None`` when not asked for)."""
    if cfg.get("submission") is None:
        yield None
        return
    with staged_output(cfg.submission, bool(cfg.overwrite)) as staging:
        yield staging


def write_submission_field(folder: Path, inputs: PairInputs, result: RegistrationResult) -> Path:
    """Write a result's field into the submission folder; returns the file."""
    disp = voxel_displacement(result.field.disp_mm, inputs.fixed.affine, inputs.moving.affine)
    name = submission_name(inputs.fixed.path, inputs.moving.path)
    return write_displacement(folder / name, disp, inputs.fixed.affine)


def score_submission(folder: Path, cfg: DictConfig, config: EvaluationConfig, report: Path) -> str:
    """Score the submission folder (:func:`regnet.learn2reg.evaluate_submission`), write the
    results to ``report`` (JSON; non-finite values as ``null``) and return the aggregates as
    Markdown."""
    results = evaluate_submission(folder, Path(cfg.learn2reg).parent, config)
    report.write_text(json.dumps(_finite(results), indent=2) + "\n")
    return aggregates_markdown(results)


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
