import os

import gin
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _clear_gin():
    """Every test starts and ends with an empty, unlocked gin config."""
    gin.clear_config(clear_constants=True)
    yield
    gin.clear_config(clear_constants=True)
