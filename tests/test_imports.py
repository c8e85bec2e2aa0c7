"""Start-up cost of the command-line tools: heavy libraries are imported only where needed.

Each check runs a fresh interpreter, since this test session has long imported everything.
``import monai`` alone runs ``monai/__init__`` (networks, torchvision models, ``torch._dynamo``):
several seconds on every ``register.py`` call, which needs none of it. ``regnet.cli.register``
covers ``regnet.pipeline``, ``regnet.outputs``, ``regnet.metrics``, ``regnet.optimize`` and
``regnet.spatial.smooth``.
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("monai", "torchvision", "lightning")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )


def test_register_command_imports_no_heavy_library() -> None:
    run = run_python(
        "import sys, regnet.cli.register, regnet.cli.predict\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [], f"importing register and predict loaded {run.stdout.strip()}"


def test_register_command_leaves_scipy_and_simpleitk_to_what_needs_them() -> None:
    """NIfTI pairs on voxel-aligned grids need neither scipy.ndimage nor SimpleITK (0.35 s of every
    command; nibabel itself imports the bare scipy package)."""
    run = run_python(
        "import sys, regnet.cli.register\n"
        "print(' '.join(m for m in ('scipy.ndimage', 'SimpleITK', 'sympy') if m in sys.modules))\n"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [], f"importing register loaded {run.stdout.strip()}"


def test_data_package_names_stay_importable() -> None:
    run = run_python(
        "import sys, regnet.data\n"
        "from regnet.data.io import DataError\n"
        "assert 'monai' not in sys.modules and 'lightning' not in sys.modules\n"
        "from regnet.data import SyntheticPairs, EpochSampler, build_augmentation\n"
        "assert regnet.data.DataError is DataError\n"
        "assert set(regnet.data.__all__) <= set(dir(regnet.data))\n"
    )
    assert run.returncode == 0, run.stderr
