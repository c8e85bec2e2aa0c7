"""Classical per-pair registration by gradient descent (the engine behind ``register.py``).

:func:`register` aligns two images on one grid with a rigid, affine, B-spline, dense or
diffeomorphic (SVF) transform through a multi-resolution pyramid; :func:`refine` improves a
network's DDF on one pair (instance optimisation); :mod:`regnet.optimize.safeguard` checks a
result against its start. Conventions: :mod:`regnet.spatial`.
"""

from regnet.optimize.engine import (
    DEFAULT_ITERATIONS,
    DEFAULT_LR,
    INITS,
    REFINE_TRANSFORMS,
    TRANSFORMS,
    LevelHistory,
    RegistrationResult,
    refine,
    register,
)

__all__ = [
    "DEFAULT_ITERATIONS",
    "DEFAULT_LR",
    "INITS",
    "TRANSFORMS",
    "REFINE_TRANSFORMS",
    "LevelHistory",
    "RegistrationResult",
    "refine",
    "register",
]
