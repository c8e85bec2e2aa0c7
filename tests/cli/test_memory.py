"""The command line keeps freed memory for reuse (:func:`regnet.cli.common.reuse_freed_memory`)."""

import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys, torch
from regnet.cli.common import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else True
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # an iteration's tensors: fields of 44 MB, an image of 16 MB
    field = torch.empty(11 * 2**20).fill_(1.0)
    image = torch.empty(4 * 2**20).fill_(2.0)
    total = field * 2.0 + image.sum()
    del field, image, total
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> tuple[bool, int]:
    run = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True
    )
    applied, faults = run.stdout.split()
    return applied == "True", int(faults)


def test_freed_tensors_are_reused_instead_of_faulted_in_again():
    applied, reused = _page_faults("reuse")
    if not applied:
        pytest.skip("the C library is not glibc")
    _, plain = _page_faults("plain")
    # without it every 44 MB block is a fresh mapping: about 26k page faults per iteration
    assert plain > 200_000 and reused < plain / 4
