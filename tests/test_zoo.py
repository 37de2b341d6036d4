import json

import pytest
import torch
from safetensors.torch import load_file

from dfqkit import zoo
from dfqkit.models import mnist_resnet


@pytest.fixture(scope="module")
def one_thread():
    """Train on one thread: two busy-waiting intra-op threads on a shared 2-core machine can
    run 10x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, one_thread):
    """A zoo cache holding mnist_resnet8 trained for one epoch (a few seconds)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFQKIT_CACHE", str(root))
        state = torch.get_rng_state()
        metrics = zoo.train_teacher("mnist_resnet8", seed=3, epochs=1)
        assert torch.equal(torch.get_rng_state(), state), "training changed the global RNG"
        yield root, metrics


@pytest.fixture
def env(cache, monkeypatch):
    monkeypatch.setenv("DFQKIT_CACHE", str(cache[0]))
    return cache


def test_training_writes_weights_and_metrics(env):
    root, metrics = env
    weights = root / "zoo" / "mnist_resnet8.safetensors"
    assert zoo.zoo_path("mnist_resnet8") == weights and weights.is_file()
    saved = json.loads((root / "zoo" / "mnist_resnet8.json").read_text())
    assert saved == metrics
    for key in ("test_top1", "val_top1", "seed", "epochs", "seconds", "torch_version"):
        assert key in saved
    assert saved["seed"] == 3 and saved["epochs"] == 1 and 10 < saved["test_top1"] <= 100
    assert not list((root / "zoo").glob("*.tmp"))  # atomic writes leave no temp files


def test_ensure_teacher_and_zoo_weights(env):
    path = zoo.ensure_teacher("mnist_resnet8")
    model = mnist_resnet()  # weights="zoo"
    state = load_file(str(path))
    assert torch.equal(model.output.weight, state["output.weight"])


def test_cached_teacher_is_not_retrained(env):
    before = zoo.zoo_path("mnist_resnet8").stat().st_mtime_ns
    assert zoo.train_teacher("mnist_resnet8") == env[1]
    assert zoo.zoo_path("mnist_resnet8").stat().st_mtime_ns == before


def test_same_seed_gives_identical_weights(env, tmp_path, monkeypatch):
    monkeypatch.setenv("DFQKIT_CACHE", str(tmp_path))
    zoo.train_teacher("mnist_resnet8", seed=3, epochs=1)
    first = load_file(str(env[0] / "zoo" / "mnist_resnet8.safetensors"))
    again = load_file(str(zoo.zoo_path("mnist_resnet8")))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_missing_teacher_error_gives_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DFQKIT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m dfqkit.zoo train mnist_resnet8"):
        zoo.ensure_teacher("mnist_resnet8")


def test_unknown_name_lists_valid_names():
    with pytest.raises(
        ValueError, match="valid names: mnist_resnet8.*Did you mean 'mnist_resnet8'"
    ):
        zoo.zoo_path("mnist_resnet")
    with pytest.raises(ValueError, match="unknown zoo teacher 'cifar'"):
        zoo.train_teacher("cifar")


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("DFQKIT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert zoo.cache_dir() == tmp_path / ".cache" / "dfqkit" / "zoo"


def test_cli(env, capsys):
    assert zoo.main(["path", "mnist_resnet8"]) == 0
    assert capsys.readouterr().out.strip() == str(zoo.zoo_path("mnist_resnet8"))
    assert zoo.main(["list"]) == 0
    assert "mnist_resnet8" in capsys.readouterr().out
    assert zoo.main(["train", "nope"]) == 2
    assert "valid names: mnist_resnet8" in capsys.readouterr().err


def test_the_teacher_trains_on_one_thread_whatever_the_process_uses(env, tmp_path, monkeypatch):
    monkeypatch.setenv("DFQKIT_CACHE", str(tmp_path))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        metrics = zoo.train_teacher("mnist_resnet8", seed=3, epochs=1)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert metrics["threads"] == 1
    first = load_file(str(env[0] / "zoo" / "mnist_resnet8.safetensors"))  # one-thread process
    again = load_file(str(zoo.zoo_path("mnist_resnet8")))
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(ValueError, match="threads must be an integer >= 1 or None, got 0"):
        zoo.train_teacher("mnist_resnet8", force=True, threads=0)
