import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Run the tiny models on one thread: faster for them, and immune to OpenMP spin-waiting on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
