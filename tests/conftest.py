import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models on two shared cores: spin-waiting OpenMP threads only slow them down."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
