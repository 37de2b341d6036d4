"""Non-finite steps are skipped on the device: parameters and optimizer state come out exactly as
if the step had not been taken, without a host synchronisation; the trainer logs them and stops
after a configured number in a row, keeping what was saved."""

import json
import logging

import pytest
import torch

from dfqkit import checkpoint as ckpt
from dfqkit.guard import NonFiniteLossError, StepGuard
from dfqkit.losses.kd import KDLoss
from dfqkit.train import main, run

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.5, 0.999)),
    "sgd_nesterov": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    ),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def _step(guard, model, x, bad=None):
    """One guarded step on ``x``; ``bad`` = "loss" (NaN loss) or "grad" (finite loss, inf
    gradient)."""
    guard.optimizer.zero_grad(set_to_none=True)
    loss = model(x).square().mean()
    if bad == "loss":
        loss = loss * float("nan")
    loss.backward()
    if bad == "grad":
        model.weight.grad[0, 0] = float("inf")
        loss = loss.detach()
    guard.step(loss)


def _snapshot(model, opt):
    state = {
        (i, k): v.clone()
        for i, p in enumerate(model.parameters())
        for k, v in opt.state.get(p, {}).items()
        if isinstance(v, torch.Tensor)
    }
    return [p.detach().clone() for p in model.parameters()], state


def _assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


HOST = pytest.mark.parametrize("on_host", [False, True], ids=["device", "host"])


@HOST
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_a_skipped_step_leaves_parameters_and_state_exactly_as_they_were(name, bad, on_host):
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    runs = []
    for with_bad in (False, True):
        model = _model()
        opt = OPTIMIZERS[name](model.parameters())
        guard = StepGuard(opt, torch.device("cpu"), decide_on_host=on_host)
        _step(guard, model, x1)
        if with_bad:
            _step(guard, model, x2, bad=bad)
        _step(guard, model, x2)
        runs.append(_snapshot(model, opt))
    _assert_same(*runs)  # bit-identical to never having taken the bad step


@HOST
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_bad_first_step_equals_a_fresh_start(name, on_host):
    """The optimizer's lazily created state (moments, momentum buffer) is put back to a fresh
    start, so bad-then-good equals good alone."""
    x = torch.randn(5, 4)
    runs = []
    for with_bad in (False, True):
        model = _model()
        opt = OPTIMIZERS[name](model.parameters())
        guard = StepGuard(opt, torch.device("cpu"), decide_on_host=on_host)
        if with_bad:
            _step(guard, model, x, bad="loss")
        _step(guard, model, x)
        _step(guard, model, x)
        runs.append(_snapshot(model, opt))
    _assert_same(*runs)


@HOST
@pytest.mark.parametrize("bad", [None, "loss"])
def test_a_skipped_step_also_puts_back_the_buffers_its_forward_changed(bad, on_host):
    """BN running statistics (a generator in train mode) and an observer's range change in the
    forward, before the loss is known: a skipped step restores them, a good one keeps them."""
    from dfqkit.quant import EMAActQuantizer, set_quant_mode

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3),
                                EMAActQuantizer(bits=4)).train()  # fmt: skip
    set_quant_mode(model, "observe")
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    guard = StepGuard(opt, torch.device("cpu"), modules=[model], decide_on_host=on_host)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guard.begin()
    loss = model(torch.randn(8, 4)).square().mean()
    if bad:
        loss = loss * float("nan")
    loss.backward()
    guard.step(loss)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if bad:
        assert changed == []  # running_mean, running_var, num_batches_tracked, lo, hi: back
    else:
        assert {"1.running_mean", "1.num_batches_tracked", "2.hi"} <= set(changed)


def test_begin_keeps_only_the_buffers_the_forward_can_change():
    """An eval-mode BN and a frozen quantizer leave their buffers alone: nothing to keep."""
    from dfqkit.quant import EMAActQuantizer, set_quant_mode

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3),
                                EMAActQuantizer(bits=4))  # fmt: skip
    guard = StepGuard(torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"),
                      modules=[model])  # fmt: skip
    bn, quant = model[1], model[2]
    set_quant_mode(model, "observe")
    model.train()
    assert {id(b) for b in guard.changing_buffers()} == {
        id(b) for b in [*bn.buffers(), *quant.buffers()]
    }
    model.eval()
    assert {id(b) for b in guard.changing_buffers()} == {id(b) for b in quant.buffers()}
    set_quant_mode(model, "frozen")
    assert guard.changing_buffers() == []


@HOST
def test_counts_skipped_steps_and_runs_in_a_row_across_pops(on_host):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard(opt, torch.device("cpu"), decide_on_host=on_host)
    x = torch.randn(5, 4)
    for bad in (None, "loss", "loss", None, "grad"):
        _step(guard, model, x, bad=bad)
    assert guard.pop() == (3, 2)
    _step(guard, model, x, bad="loss")  # the run of one carried over continues
    assert guard.pop() == (1, 2)
    _step(guard, model, x)
    assert guard.pop() == (0, 0)


def test_the_guarded_step_never_reads_a_value_on_the_host(monkeypatch):
    """(The device path, which a GPU takes; on the CPU the guard reads the flag, no sync.)"""
    model = _model()  # (SGD: PyTorch's Adam itself reads its CPU step counter with .item())
    opt = OPTIMIZERS["sgd_nesterov"](model.parameters())
    guard = StepGuard(opt, torch.device("cpu"), decide_on_host=False)
    x = torch.randn(5, 4)

    def sync(*_a, **_k):
        raise AssertionError("host sync in the guarded step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    _step(guard, model, x)
    _step(guard, model, x, bad="loss")
    monkeypatch.undo()
    assert guard.pop() == (1, 1)


TINY = [
    "EPOCHS = 3",
    "ITERS_PER_EPOCH = 2",
    "BATCH_SIZE = 8",
    "train.warmup_epochs = 1",
    "train.calib_epochs = 1",
    "LATENT_DIM = 8",
    "generators.ConditionalGenerator.width = 16",
]
RECIPE = "recipes/mnist/gdfq_w4a4.gin"


def _nan_on(monkeypatch, calls):
    """KDLoss (a student loss) returns NaN on the given 1-based calls."""
    original = KDLoss.forward
    seen = {"n": 0}

    def forward(self, step):
        seen["n"] += 1
        value = original(self, step)
        return value * float("nan") if seen["n"] in calls else value

    monkeypatch.setattr(KDLoss, "forward", forward)


@pytest.mark.slow
def test_a_transient_nan_is_skipped_logged_and_counted(teacher_env, tmp_path, monkeypatch, caplog):
    _nan_on(monkeypatch, {2})
    with caplog.at_level(logging.WARNING):
        m = run([RECIPE], TINY, output_dir=tmp_path / "r")
    assert m["epochs_done"] == 3 and m["skipped_steps"] == {"student": 1}
    assert "epoch 2: skipped 1 student step(s) with a non-finite loss" in caplog.text
    student = ckpt.latest_checkpoint(tmp_path / "r") / "model_1.safetensors"
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(student).values())
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["skipped_steps"] == {
        "student": 1
    }


@pytest.mark.slow
def test_nan_in_a_row_stops_the_run_with_one_line_and_keeps_checkpoints(
    teacher_env, tmp_path, monkeypatch, capsys
):
    _nan_on(monkeypatch, set(range(1, 100)))
    out = tmp_path / "r"
    args = ["--gin", RECIPE, "--output_dir", str(out)]
    for p in [*TINY, "train.max_nonfinite_in_a_row = 2"]:
        args += ["--gin_param", p]
    assert main(args) == 3
    err = capsys.readouterr().err  # (progress bars also go to stderr)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dfqkit.train: stopped: 2 steps in a row had a non-finite loss")
    assert "epoch-0001" in last  # the checkpoint before the bad epoch is named and kept
    assert ckpt.latest_checkpoint(out).name == "epoch-0001"
    assert not (out / "metrics.json").exists()
    with pytest.raises(NonFiniteLossError):
        run([RECIPE], [*TINY, "train.max_nonfinite_in_a_row = 2"], output_dir=out, resume=True)
