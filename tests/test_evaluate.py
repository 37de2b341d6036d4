"""Evaluation: top-1/top-5, agreement with a teacher, and the teacher's cached predictions."""

import pytest
import torch
from torch import nn

from dfqkit import config as cfg
from dfqkit.build import build_run
from dfqkit.evaluate import evaluate
from dfqkit.quant import set_quant_mode


def _loader(n=10, batch=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_agreement_with_cached_teacher_predictions_equals_running_the_teacher():
    torch.manual_seed(0)
    model, teacher = nn.Linear(5, 3), nn.Linear(5, 3)
    loader = _loader()
    ref = evaluate(teacher, loader, predictions=True)
    x = torch.cat([b[0] for b in loader])
    assert torch.equal(ref["predictions"], teacher(x).argmax(1))  # loader order
    live = evaluate(model, loader, teacher=teacher)
    cached = evaluate(model, loader, teacher=ref["predictions"])
    assert cached == live
    # hand count: agreement is the share of equal argmaxes
    want = 100 * (model(x).argmax(1) == teacher(x).argmax(1)).double().mean().item()
    assert cached["agree"] == pytest.approx(want)
    with pytest.raises(ValueError, match="cover 9 images"):
        evaluate(model, loader, teacher=ref["predictions"][:9])
    with pytest.raises(ValueError, match="cover 11 images, the loader 10"):
        evaluate(model, loader, teacher=torch.cat([ref["predictions"], ref["predictions"][:1]]))


def test_a_run_evaluates_the_teacher_on_the_test_split_once(teacher_env, tmp_path, monkeypatch):
    cfg.parse(["recipes/mnist/gdfq_w4a4.gin"], ["BATCH_SIZE = 8"])
    run = build_run(output_dir=tmp_path, for_training=False)
    with torch.no_grad():  # observe one batch, then freeze: evaluation must not move ranges
        run.student_module(torch.randn(8, 1, 28, 28))
    set_quant_mode(run.student_module, "frozen")
    calls = []
    run.teacher.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    rng = torch.get_rng_state()
    run.teacher_test()  # lazy first use: the loader's seed draw is undone (resume = no resume)
    assert torch.equal(torch.get_rng_state(), rng)
    n_teacher = len(calls)
    first = run.evaluate(run.student_module, "test")
    second = run.evaluate(run.student_module, "test")
    assert n_teacher > 0 and len(calls) == n_teacher  # the second evaluation reused them
    assert first == second
    live = evaluate(run.student_module, run.loaders["test"], teacher=run.teacher)
    assert first["agree"] == live["agree"] and first["top1"] == live["top1"]
    assert "agree" not in run.evaluate(run.student_module, "val")


@pytest.mark.slow
def test_a_set_whose_val_is_its_test_split_is_evaluated_once_per_epoch(
    teacher_env, tmp_path, monkeypatch
):
    from dfqkit.bench import SPEED_BINDINGS
    from dfqkit.run import Run
    from dfqkit.train import run as train_run

    splits = []
    original = Run.evaluate

    def counting(self, model, split):
        splits.append(split)
        return original(self, model, split)

    monkeypatch.setattr(Run, "evaluate", counting)
    tiny = ["EPOCHS = 2", "ITERS_PER_EPOCH = 1", "BATCH_SIZE = 4", "train.warmup_epochs = 1",
            "train.calib_epochs = 1", "train.naive_batches = 1"]  # fmt: skip
    params = [p for p in SPEED_BINDINGS if not p.startswith(("TEACHER_WEIGHTS", "DATA_ROOT"))]
    m = train_run(["recipes/mnist/gdfq_w4a4.gin"], [*params, *tiny], output_dir=tmp_path / "r")
    # the naive reference once, then one evaluation per epoch: never "val" (it is the test set)
    assert splits == ["test", "test", "test"]
    assert all(h["val_top1"] == h["test_top1"] for h in m["history"])
