"""A same-machine timing reference: GDFQ's training iteration as the official code runs it.

``python -m dfqkit.bench speed --reference gdfq`` times this beside dfqkit's own step, so the
speed-up is measured on one machine at one moment rather than against a figure taken elsewhere.
It is written from the description of the official code (xushoukai/GDFQ ``trainer.py`` /
``main.py``; docs/methods.md), not copied from it, and keeps what costs time there:

* the generator upsamples (nearest ×2) and then convolves at full resolution;
* BN hooks compute mean and biased variance of every teacher BN input with ``var``;
* the teacher's parameters require gradients, so the generator's backward also computes them;
* the quantized student is computed every iteration with autograd (its loss too), then stepped;
* weights are fake-quantized per output channel with out-of-place ops at every forward
  (``contiguous().view`` + min/max, ``round``, ``clamp``, dequantize), activations after every
  ReLU with a per-tensor frozen range;
* per-iteration host syncs for the logged accuracy (``.cpu().numpy()``);
* the calibration phase (the official warm-up epochs): activation ranges follow an EMA of each
  batch's min and max (momentum 0.9 with bias correction), the student's forward still builds
  its autograd graph and computes its loss, nothing steps it, and its output and loss stay
  referenced until the next iteration reassigns them, so that graph is alive during the next
  generator step — the calibration phase's peak memory, which a timing of the training phase
  alone misses.

Only :func:`reference_iteration` and :func:`peak_rss_mb` (which the bench shares) are public;
nothing here is used by training.
"""

from __future__ import annotations

import copy
import resource
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class _Generator(nn.Module):
    def __init__(self, num_classes: int, image_size: int, channels: int, latent: int = 100):
        super().__init__()
        self.init = image_size // 4
        self.emb = nn.Embedding(num_classes, latent)
        self.l1 = nn.Linear(latent, 128 * self.init**2)
        self.b0 = nn.BatchNorm2d(128)
        self.b1 = nn.Sequential(
            nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128, 0.8), nn.LeakyReLU(0.2, inplace=True)
        )
        self.b2 = nn.Sequential(
            nn.Conv2d(128, 64, 3, 1, 1),
            nn.BatchNorm2d(64, 0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(64, channels, 3, 1, 1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.l1(self.emb(labels) * z).view(z.shape[0], 128, self.init, self.init)
        x = F.interpolate(self.b0(x), scale_factor=2)
        x = F.interpolate(self.b1(x), scale_factor=2)
        return self.b2(x)


def _fake_quant_out_of_place(x, lo, hi, bits):
    n = 2**bits - 1
    scale = n / torch.clamp(hi - lo, min=1e-8)
    zero = torch.round(scale * lo) + 2 ** (bits - 1)
    q = torch.clamp(torch.round(scale * x - zero), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q + zero) / scale


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lo, hi, bits):
        return _fake_quant_out_of_place(x, lo, hi, bits)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class _QuantConv(nn.Conv2d):
    bits = 4

    def forward(self, x):
        w = self.weight.contiguous().view(self.out_channels, -1)
        lo, hi = w.min(dim=1).values, w.max(dim=1).values
        wq = _STE.apply(self.weight, lo.view(-1, 1, 1, 1), hi.view(-1, 1, 1, 1), self.bits)
        return F.conv2d(x, wq, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _QuantLinear(nn.Linear):
    bits = 4

    def forward(self, x):
        lo, hi = self.weight.min(dim=1).values, self.weight.max(dim=1).values
        wq = _STE.apply(self.weight, lo.view(-1, 1), hi.view(-1, 1), self.bits)
        return F.linear(x, wq, self.bias)


class _QuantAct(nn.Module):
    def __init__(self, bits: int, beta: float = 0.9):
        super().__init__()
        self.bits = bits
        self.running = False  # True in the calibration phase
        self.beta = beta
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))  # as the official code: 0 until observed
        self.register_buffer("beta_t", torch.tensor(1.0))

    def forward(self, x):
        if self.running:  # bias-corrected EMA of the batch extremes, out of place
            self.beta_t = self.beta_t * self.beta
            lo, hi = x.detach().min(), x.detach().max()
            self.lo = (self.lo * self.beta + lo * (1 - self.beta)) / (1 - self.beta_t)
            self.hi = (self.hi * self.beta + hi * (1 - self.beta)) / (1 - self.beta_t)
        return _STE.apply(x, self.lo, self.hi, self.bits)


def _quantize_like_gdfq(model: nn.Module, w_bits: int, a_bits: int) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d):
            q = _QuantConv(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                child.stride,
                child.padding,
                child.dilation,
                child.groups,
                child.bias is not None,
            )
            q.load_state_dict(child.state_dict())
            q.bits = w_bits
            setattr(model, name, q)
        elif isinstance(child, nn.Linear):
            q = _QuantLinear(child.in_features, child.out_features, child.bias is not None)
            q.load_state_dict(child.state_dict())
            q.bits = w_bits
            setattr(model, name, q)
        elif isinstance(child, nn.ReLU | nn.ReLU6):
            setattr(model, name, nn.Sequential(child, _QuantAct(a_bits)))
        else:
            _quantize_like_gdfq(child, w_bits, a_bits)
    return model


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (Linux ``ru_maxrss`` is in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference_iteration(
    teacher: nn.Module,
    *,
    num_classes: int,
    image_size: int,
    channels: int,
    batch_size: int,
    w_bits: int,
    a_bits: int,
    iters: int = 8,
    warmup: int = 2,
) -> dict[str, float]:
    """Time the official-style GDFQ iteration in both of its phases.

    The first ``warmup`` iterations are calibration iterations (ranges observed, no student
    step, the student's graph kept alive into the next iteration, as the official warm-up
    epochs run); then the ranges are frozen and ``iters`` training iterations are timed.

    Returns ``ms_per_iter`` and ``cpu_ms_per_iter`` (medians of the training iterations),
    ``ms_calibration_iter`` (median of the calibration iterations) and
    ``peak_rss_calibration_mb`` (the process's peak RSS when the calibration phase ends).
    """
    if warmup < 1 or iters < 1:
        raise ValueError(f"warmup and iters must be >= 1, got warmup={warmup}, iters={iters}")
    teacher = copy.deepcopy(teacher).eval()  # parameters keep requires_grad, as in the original
    student = _quantize_like_gdfq(copy.deepcopy(teacher), w_bits, a_bits).eval()
    acts = [m for m in student.modules() if isinstance(m, _QuantAct)]
    gen = _Generator(num_classes, image_size, channels).train()
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_s = torch.optim.SGD(
        student.parameters(), lr=1e-4, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    stats: list[tuple[torch.Tensor, torch.Tensor, nn.Module]] = []

    def hook(module, inputs, output):
        x = inputs[0]
        stats.append((x.mean([0, 2, 3]), x.var([0, 2, 3], unbiased=False), module))

    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(hook)
    calib: list[float] = []
    times: list[float] = []
    cpu: list[float] = []
    peak_calibration = 0.0
    s_out = loss_s = None
    for i in range(warmup + iters):
        calibrating = i < warmup
        for act in acts:
            act.running = calibrating
        t0, c0 = time.perf_counter(), time.process_time()
        z = torch.randn(batch_size, 100)
        labels = torch.randint(0, num_classes, (batch_size,))
        images = gen(z, labels)
        stats.clear()
        t_out = teacher(images)
        bns = sum(
            F.mse_loss(mu, m.running_mean) + F.mse_loss(v, m.running_var) for mu, v, m in stats
        ) / len(stats)
        loss_g = F.cross_entropy(t_out, labels) + 0.1 * bns
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        # the previous iteration's s_out / loss_s (and, while calibrating, their graph) are
        # released only here, when they are reassigned
        s_out = student(images.detach())
        with warnings.catch_warnings():  # 'mean' over all elements is what the official uses
            warnings.simplefilter("ignore", UserWarning)
            kd = F.kl_div(
                F.log_softmax(s_out / 20, 1), F.softmax(t_out.detach() / 20, 1), reduction="mean"
            )
        loss_s = kd * 400 + F.cross_entropy(s_out, labels)
        if not calibrating:
            opt_s.zero_grad()
            loss_s.backward()
            opt_s.step()
        _ = (s_out.argmax(1).cpu().numpy(), t_out.argmax(1).cpu().numpy(), loss_s.item())
        if calibrating:
            calib.append(time.perf_counter() - t0)
            if i == warmup - 1:
                peak_calibration = peak_rss_mb()
        else:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {
        "ms_per_iter": 1000 * statistics.median(times),
        "cpu_ms_per_iter": 1000 * statistics.median(cpu),
        "ms_calibration_iter": 1000 * statistics.median(calib),
        "peak_rss_calibration_mb": peak_calibration,
    }
