"""Time the learnable-clip fake quantization (the paper's method's activation quantizer) alone:
forward and backward on activation-sized tensors, one thread, best of 15. Results:
docs/results.md ("The paper's method against GDFQ").

    python docs/scripts/learnable_clip_backward_bench.py
"""

import time

import torch

from dfqkit.quant import learnable_fake_quant

torch.set_num_threads(1)
torch.manual_seed(0)
for shape in [(64, 16, 28, 28), (64, 32, 14, 14), (200, 16, 32, 32)]:
    x = torch.randn(shape).relu_().requires_grad_(True)
    lo = torch.tensor(0.0, requires_grad=True)
    hi = torch.tensor(2.0, requires_grad=True)
    g = torch.randn(shape)
    backward, forward = [], []
    for _ in range(15):
        t0 = time.perf_counter()
        out = learnable_fake_quant(x, lo, hi, 3)
        t1 = time.perf_counter()
        out.backward(g)
        forward.append(t1 - t0)
        backward.append(time.perf_counter() - t1)
    print(f"{shape}: forward {1e3 * min(forward):.2f} ms, backward {1e3 * min(backward):.2f} ms")
