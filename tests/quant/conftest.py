import pytest
import torch


@pytest.fixture(autouse=True)
def _fast_cpu():
    """Randomly initialised CNNs produce denormals that slow CPU kernels ~5x: flush them."""
    previous = torch.get_num_threads()
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(previous)
