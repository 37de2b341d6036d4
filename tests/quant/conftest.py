import pytest
import torch


@pytest.fixture(autouse=True)
def _fast_cpu():
    """One thread (2 busy cores: OpenMP threads would spin against other jobs) and flushed
    denormals (randomly initialised CNNs produce them; they slow CPU kernels several times)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(previous)
