import subprocess
import sys

import pytest
import torch

from dfqkit.quant import EMAActQuantizer, MinMaxActQuantizer, fake_quant


def _batch(lo: float, hi: float) -> torch.Tensor:
    return torch.tensor([lo, (lo + hi) / 2, hi])


def _range(q) -> tuple[float, float]:
    return q.lo.item(), q.hi.item()


def test_observe_updates_then_frozen_stays_fixed():
    q = EMAActQuantizer(bits=4)
    x = torch.randn(2, 3, 4, 4)
    out = q(x)
    assert _range(q) == (x.min().item(), x.max().item())
    # the batch is quantized with the range it just updated (GDFQ order)
    torch.testing.assert_close(out, fake_quant(x, x.min(), x.max(), 4))
    q(_batch(-5.0, 5.0))
    observed = _range(q)
    assert observed != (x.min().item(), x.max().item()) and q.num_updates.item() == 2
    q.mode = "frozen"
    for scale in (10.0, 0.1):
        q(torch.randn(2, 3, 4, 4) * scale)
    assert _range(q) == observed and q.num_updates.item() == 2


def test_gdfq_bias_correction_trajectory():
    q = EMAActQuantizer(bits=8, momentum=0.9, bias_correction=True)
    assert _range(q) == (0.0, 0.0)  # GDFQ's buffers start at 0
    trajectory = []
    for _ in range(4):
        q(torch.ones(4))  # constant batch statistic 1.0
        trajectory.append(q.lo.item())
    assert trajectory == pytest.approx([1.0, 5.3, 17.8, 47.0], abs=0.1)
    assert q.hi.item() == pytest.approx(47.0, abs=0.1)


def test_plain_ema_starts_from_first_batch():
    q = EMAActQuantizer(bits=8, momentum=0.9)
    for lo, hi in [(-1.0, 1.0), (-3.0, 2.0), (-1.0, 0.0)]:
        q(_batch(lo, hi))
    # lo: -1 -> 0.9 * -1 + 0.1 * -3 = -1.2 -> 0.9 * -1.2 + 0.1 * -1 = -1.18
    # hi:  1 -> 0.9 *  1 + 0.1 *  2 =  1.1 -> 0.9 *  1.1 + 0.1 *  0 =  0.99
    assert _range(q) == pytest.approx((-1.18, 0.99))


def test_global_minmax_starts_at_zero():
    q = MinMaxActQuantizer(bits=8)
    q(_batch(1.0, 2.0))
    assert _range(q) == (0.0, 2.0)  # all-positive batch: lo stays 0
    q(_batch(-1.0, 0.5))
    assert _range(q) == (-1.0, 2.0)
    q(_batch(-0.5, 1.0))
    assert _range(q) == (-1.0, 2.0)


def test_frozen_before_observing_raises():
    q = MinMaxActQuantizer(bits=4)
    q.mode = "frozen"
    with pytest.raises(RuntimeError, match="never observed"):
        q(torch.randn(4))


def test_forward_never_syncs_with_host(monkeypatch):
    q = EMAActQuantizer(bits=4, bias_correction=True)
    q(torch.randn(8))

    def no_sync(*args, **kwargs):
        raise AssertionError("host-device sync in the forward")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "__bool__", no_sync)
    q(torch.randn(8))
    q.mode = "frozen"
    q(torch.randn(8))


def test_state_dict_restores_range_and_observed_flag():
    q = EMAActQuantizer(bits=4)
    q(torch.randn(16))
    restored = EMAActQuantizer(bits=4)
    restored.load_state_dict(q.state_dict())
    restored.mode = "frozen"  # mode is not state: the trainer sets it per phase
    x = torch.randn(16)
    torch.testing.assert_close(restored(x), fake_quant(x, q.lo, q.hi, 4))
    assert restored.num_updates.item() == 1
    # the restored update count drives the plain EMA too: next batch is averaged, not copied
    restored.mode = "observe"
    restored(_batch(-100.0, 100.0))
    assert restored.lo.item() == pytest.approx(0.9 * q.lo.item() - 10.0)


def test_repr_and_validation():
    q = EMAActQuantizer(bits=4)
    assert "bits=4" in repr(q) and "mode='observe'" in repr(q) and "range=[0, 0]" in repr(q)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1.0"):
        EMAActQuantizer(bits=4, momentum=1.0)
    with pytest.raises(ValueError, match="a_bits|bits must be in 2..16, got 17"):
        MinMaxActQuantizer(bits=17)
    q.mode = "observing"
    with pytest.raises(ValueError, match="mode must be one of 'observe', 'frozen'"):
        q(torch.randn(4))


def test_sync_without_process_group_is_a_noop():
    q = MinMaxActQuantizer(bits=4)
    q(_batch(-1.0, 3.0))
    q.sync_()
    assert _range(q) == (-1.0, 3.0)


_SYNC_WORKER = """
import sys
import torch
import torch.distributed as dist
from dfqkit.quant import EMAActQuantizer, MinMaxActQuantizer

rank, init_file = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
try:
    minmax, ema = MinMaxActQuantizer(bits=4), EMAActQuantizer(bits=4)
    batch = torch.tensor([-1.0 - rank, 1.0 + 3 * rank])  # rank 0: [-1, 1], rank 1: [-2, 4]
    minmax(batch)
    ema(batch)
    minmax.sync_()
    ema.sync_()
    got = (minmax.lo.item(), minmax.hi.item(), ema.lo.item(), ema.hi.item())
    assert got == (-2.0, 4.0, -1.5, 2.5), got
finally:
    dist.destroy_process_group()
"""


def test_sync_all_reduces_across_two_processes(tmp_path):
    # Two real processes (not mp.spawn: spawned children re-import this test module, which
    # pytest's import path makes fragile); each must exit 0 within the timeout.
    script = tmp_path / "worker.py"
    script.write_text(_SYNC_WORKER)
    init = tmp_path / "init"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(init)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
