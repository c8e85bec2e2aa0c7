"""Loss registry and the weighted sum of terms built from a spec such as ``"lncc+grad"``.

Default weights (``DEFAULT_WEIGHTS``), each for the term's own scale as defined in its module:

* similarity terms ``mse, ncc, lncc, mi, nmi, ngf`` and ``dice``, ``ddf``: 1.0.
* ``grad`` 1.0: VoxelMorph's lambda with its NCC loss (the same negative mean squared local NCC
  as ``lncc`` and the same first-difference penalty). VoxelMorph uses 0.01 with MSE on [0, 1]
  intensities: ``build_loss("mse+grad", weights={"grad": 0.01})``.
* ``bending`` 1.0: for a sinusoidal field of wavenumber ``k`` (radians per voxel) bending
  energy is ``ndim * k^2`` times ``grad``, so at 1.0 it matches ``grad``'s strength at a
  wavelength of about 11 voxels in 3D and penalises smoother fields less.
* ``jacobian`` 1.0: zero on any field without folding, so it only acts where ``det J < 0.01``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from regnet.losses.image import LNCC, MSE, NCC, NGF, MutualInformation, NormalizedMutualInformation
from regnet.losses.label import Dice
from regnet.losses.mind import MIND
from regnet.losses.regularizers import BendingEnergy, Diffusion, JacobianFolding
from regnet.losses.supervised import DDFRegression
from regnet.losses.term import LossTerm

LOSS_TERMS: dict[str, type[LossTerm]] = {
    "mse": MSE,
    "ncc": NCC,
    "lncc": LNCC,
    "mi": MutualInformation,
    "nmi": NormalizedMutualInformation,
    "ngf": NGF,
    "mind": MIND,
    "dice": Dice,
    "ddf": DDFRegression,
    "grad": Diffusion,
    "bending": BendingEnergy,
    "jacobian": JacobianFolding,
}

DEFAULT_WEIGHTS: dict[str, float] = {
    "mse": 1.0,
    "ncc": 1.0,
    "lncc": 1.0,
    "mi": 1.0,
    "nmi": 1.0,
    "ngf": 1.0,
    "mind": 1.0,
    "dice": 1.0,
    "ddf": 1.0,
    "grad": 1.0,
    "bending": 1.0,
    "jacobian": 1.0,
}


class CompositeLoss(nn.Module):
    """Weighted sum of named loss terms.

    ``forward(inputs) -> (total, {name: unweighted value})``; ``requires`` is the union of the
    terms' required input keys, in term order.
    """

    def __init__(self, terms: Mapping[str, LossTerm], weights: Mapping[str, float]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("CompositeLoss needs at least one term")
        missing = [name for name in terms if name not in weights]
        if missing:
            raise ValueError(f"no weight given for loss term(s) {', '.join(missing)}")
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = {name: float(weights[name]) for name in terms}

    @property
    def requires(self) -> tuple[str, ...]:
        keys: dict[str, None] = {}
        for term in self.terms.values():
            keys.update(dict.fromkeys(term.requires))
        return tuple(keys)

    def check(self, available: Iterable[str]) -> None:
        """Raise ``ValueError`` naming every term whose required inputs are not in ``available``."""
        available = set(available)
        problems = []
        for name, term in self.terms.items():
            missing = [key for key in term.requires if key not in available]
            if missing:
                problems.append(
                    f"loss term '{name}' needs inputs {', '.join(missing)}, "
                    "which this data does not provide"
                )
        if problems:
            raise ValueError("; ".join(problems))

    def forward(
        self, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check(inputs.keys())
        values = {name: term(inputs) for name, term in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in values.items())
        return total, values

    def extra_repr(self) -> str:
        return " + ".join(f"{w:g}*{name}" for name, w in self.weights.items())


def parse_spec(spec: str) -> list[str]:
    """Split ``"lncc+grad"`` into term names, checking each against the registry."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"loss spec must be a non-empty string like 'lncc+grad', got {spec!r}")
    names = [part.strip().lower() for part in spec.split("+")]
    unknown = [name for name in names if name not in LOSS_TERMS]
    if unknown:
        raise ValueError(
            f"unknown loss term(s) {', '.join(repr(n) for n in unknown)} in spec {spec!r}; "
            f"valid names: {', '.join(LOSS_TERMS)}"
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"loss term(s) {', '.join(duplicates)} repeated in spec {spec!r}")
    return names


def build_loss(
    spec: str,
    weights: Mapping[str, float] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> CompositeLoss:
    """Build a :class:`CompositeLoss` from ``spec`` (term names joined by ``+``).

    Args:
        spec: e.g. ``"lncc+grad"``, ``"mi+bending+dice"``; names from ``LOSS_TERMS``.
        weights: per-term weights overriding ``DEFAULT_WEIGHTS``; keys must appear in ``spec``.
        options: per-term constructor keyword arguments, e.g. ``{"lncc": {"window": 7}}``; keys
            must appear in ``spec``.
    """
    names = parse_spec(spec)
    weights = dict(weights or {})
    options = dict(options or {})
    for label, given in (("weights", weights), ("options", options)):
        stray = [name for name in given if name not in names]
        if stray:
            raise ValueError(
                f"{label} given for term(s) {', '.join(stray)} that are not in spec {spec!r}"
            )
    terms = {}
    for name in names:
        try:
            terms[name] = LOSS_TERMS[name](**dict(options.get(name, {})))
        except TypeError as error:
            raise ValueError(f"bad options for loss term '{name}': {error}") from None
    return CompositeLoss(terms, {name: weights.get(name, DEFAULT_WEIGHTS[name]) for name in names})
