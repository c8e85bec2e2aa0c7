"""Test-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Unit tests use tiny tensors: one thread avoids thread start-up and contention costs
    (a debug fit ran ~3x faster than with two threads on a shared 2-core CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
