"""The glibc malloc settings are accepted where there is glibc (numerically neutral)."""

import sys

import pytest
import torch

from dfqkit.allocator import tune_malloc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tune_malloc_is_accepted_and_changes_no_value():
    torch.manual_seed(0)
    x = torch.randn(256, 1024)
    before = (x @ x.T).sum()
    assert tune_malloc() is True
    assert torch.equal((x @ x.T).sum(), before)
