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


@pytest.fixture(scope="session")
def zoo_teacher(tmp_path_factory):
    """A one-epoch mnist_resnet8 in a private zoo cache (the real zoo code path)."""
    import os

    from dfqkit.zoo import train_teacher

    cache = tmp_path_factory.mktemp("zoo")
    old = os.environ.get("DFQKIT_CACHE")
    os.environ["DFQKIT_CACHE"] = str(cache)
    train_teacher("mnist_resnet8", epochs=1)
    train_teacher("mnist_vit", epochs=1)
    yield cache
    if old is None:
        os.environ.pop("DFQKIT_CACHE", None)
    else:
        os.environ["DFQKIT_CACHE"] = old


@pytest.fixture()
def teacher_env(zoo_teacher, monkeypatch):
    monkeypatch.setenv("DFQKIT_CACHE", str(zoo_teacher))
    return zoo_teacher
