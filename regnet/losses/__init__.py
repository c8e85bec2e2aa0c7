"""Registration losses: image similarity, label overlap, supervised field error, regularisers.

Every term is an ``nn.Module`` with a ``requires`` tuple of input-dict keys and
``forward(inputs) -> scalar`` (lower is better); :func:`build_loss` builds a weighted
:class:`CompositeLoss` from a spec such as ``"lncc+grad"``. Input keys and shapes are listed in
``docs/architecture.md``; fields follow the conventions of :mod:`regnet.spatial`.
"""

from regnet.losses.composite import (
    DEFAULT_WEIGHTS,
    LOSS_TERMS,
    CompositeLoss,
    build_loss,
    parse_spec,
)
from regnet.losses.image import (
    LNCC,
    MSE,
    NCC,
    NGF,
    MutualInformation,
    NormalizedMutualInformation,
    joint_histogram,
)
from regnet.losses.label import Dice
from regnet.losses.lncc import box_sum, local_ncc
from regnet.losses.mind import MIND, mind_ssc
from regnet.losses.regularizers import BendingEnergy, Diffusion, JacobianFolding
from regnet.losses.supervised import DDFRegression
from regnet.losses.term import LossTerm

__all__ = [
    "DEFAULT_WEIGHTS",
    "LNCC",
    "LOSS_TERMS",
    "MIND",
    "MSE",
    "NCC",
    "NGF",
    "BendingEnergy",
    "CompositeLoss",
    "DDFRegression",
    "Dice",
    "Diffusion",
    "JacobianFolding",
    "LossTerm",
    "MutualInformation",
    "NormalizedMutualInformation",
    "box_sum",
    "build_loss",
    "joint_histogram",
    "local_ncc",
    "mind_ssc",
    "parse_spec",
]
