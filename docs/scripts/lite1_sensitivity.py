"""Where EfficientNet-Lite1 loses at 6 bits: one quantizer at a time.

The reference is the CPU recipes' quantization at W8A8 (per-channel min/max weights, min/max
activation ranges after every ReLU6 observed on 8 batches of 16 Gaussian-noise images, analytic
bias correction, 8-bit first and last layers). Each row lowers **one** quantizer to ``LOW`` bits
(default 6) and scores the model on the 256 photo crops of ``recipes/cpu/*``: top-1 agreement
with the float model and the KL divergence from its predictions (more sensitive than agreement:
a near-tie flips agreement, KL moves smoothly). ``act`` lowers each activation quantizer (and
records its range and the per-channel maximum of its input on the crops); ``weights`` lowers
each conv/linear's weights, with bias correction recomputed for it. Results: docs/cpu.md,
"Where the 6-bit loss sits". One thread:

    OMP_NUM_THREADS=1 python docs/scripts/lite1_sensitivity.py act OUT.jsonl [LOW]
    OMP_NUM_THREADS=1 python docs/scripts/lite1_sensitivity.py weights OUT.jsonl [LOW]
"""

import copy
import json
import sys
import time

import torch
from lite1_setup import lite1_and_crops

from dfqkit.ptq import BiasCorrection
from dfqkit.quant import quantize_
from dfqkit.quant.act_base import ActQuantizer
from dfqkit.quant.act_minmax import MinMaxActQuantizer
from dfqkit.quant.api import set_quant_mode
from dfqkit.quant.config import QuantConfig
from dfqkit.quant.modules import QuantConv2d, QuantLinear

if len(sys.argv) < 3 or sys.argv[1] not in ("act", "weights"):
    sys.exit("usage: lite1_sensitivity.py act|weights OUT.jsonl [LOW]")
mode, out = sys.argv[1], sys.argv[2]
low = int(sys.argv[3]) if len(sys.argv) > 3 else 6
torch.set_num_threads(1)
teacher, imgs, _ = lite1_and_crops()


def logits(model):
    with torch.no_grad():
        return torch.cat([model(imgs[i : i + 32]) for i in range(0, len(imgs), 32)])


lf = logits(teacher)
ref = lf.argmax(-1)


def score(model):
    lq = logits(model)
    kl = torch.nn.functional.kl_div(
        lq.log_softmax(-1), lf.log_softmax(-1), log_target=True, reduction="batchmean"
    ).item()
    return round(100 * (lq.argmax(-1) == ref).float().mean().item(), 2), round(kl, 5)


def emit(rec):
    print(json.dumps(rec), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")


bc = BiasCorrection()
state = bc.before(teacher, imgs[:2])
cfg = QuantConfig(
    w_bits=8,
    a_bits=8,
    act_quantizer=MinMaxActQuantizer,
    first_layer_bits=8,
    last_layer_bits=8,
)
base = quantize_(copy.deepcopy(teacher), cfg, imgs[:2]).eval()
if mode == "act":  # corrected before its ranges are observed, as the recipes do
    bc.after(base, state)
set_quant_mode(base, "observe")
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for _ in range(8):
        base(torch.randn(16, 3, 240, 240, generator=g))
set_quant_mode(base, "frozen")

if mode == "weights":  # ranges observed uncorrected; bias correction recomputed per variant
    s = copy.deepcopy(base)
    bc.after(s, state)
    agree, kl = score(s)
    emit(dict(name="W8A8 all", agree=agree, kl=kl))
    names = [n for n, m in base.named_modules() if isinstance(m, QuantConv2d | QuantLinear)]
    for n in names:
        t0 = time.time()
        s = copy.deepcopy(base)
        m = dict(s.named_modules())[n]
        m.weight_quant.bits = low
        bc.after(s, state)
        agree, kl = score(s)
        emit(
            dict(
                name=n,
                groups=getattr(m, "groups", 1),
                shape=list(m.weight.shape),
                agree=agree,
                kl=kl,
                s=round(time.time() - t0, 1),
            )
        )
else:
    s = base
    quantizers = [(n, m) for n, m in s.named_modules() if isinstance(m, ActQuantizer)]
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            x = inputs[0]
            seen.setdefault(name, []).append(x.amax(dim=(0, 2, 3)) if x.dim() == 4 else x.amax(0))

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in quantizers]
    agree, kl = score(s)
    for h in hooks:
        h.remove()
    emit(dict(name="W8A8 all", agree=agree, kl=kl))
    for n, m in quantizers:
        channel_max = torch.stack(seen[n]).amax(0)
        t0 = time.time()
        m.bits = low
        agree, kl = score(s)
        m.bits = 8
        emit(
            dict(
                name=n,
                C=channel_max.numel(),
                lo=round(m.lo.item(), 3),
                hi=round(m.hi.item(), 3),
                crop_max=round(channel_max.max().item(), 3),
                channel_max_q10_50_90=[
                    round(v, 3)
                    for v in channel_max.quantile(torch.tensor([0.1, 0.5, 0.9])).tolist()
                ],
                agree=agree,
                kl=kl,
                s=round(time.time() - t0, 1),
            )
        )
    for _, m in quantizers:
        m.bits = low
    agree, kl = score(s)
    emit(dict(name=f"W8A{low} all", agree=agree, kl=kl))
