import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny networks run faster on one thread than on busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
