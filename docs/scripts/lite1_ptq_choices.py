"""What EfficientNet-Lite1 needs to quantize well without data: a grid of quantization choices,
each scored by top-1 agreement with the float model on the 256 photo crops of
``recipes/cpu/*`` (val + test: nothing is selected here; ``agree_test`` is the recipes' test half).

Every variant quantizes the float model anew, observes its activation ranges on the same
synthetic images (a ZeroQ set from ``recipes/cpu/lite1_zeroq_w4a8.gin``'s cache, or Gaussian
noise for the naive rows) and is evaluated once; no training. Results and what they decided:
docs/cpu.md, "What Lite1 needs". One thread:

    python -m dfqkit.train --gin recipes/cpu/lite1_zeroq_w4a8.gin      # once: the synthetic set
    OMP_NUM_THREADS=1 python docs/scripts/lite1_ptq_choices.py OUT.jsonl \
        ~/.cache/dfqkit/synthetic/<key printed by that run> [FILTER] [round2|round3|margins|squant]

``round3`` splits W6A6's loss into its weight and activation parts and tries empirical bias
correction (each layer's per-channel output mean matched to the float model's on the given
images, in execution order) on the synthetic set and, as an upper bound that is not data-free,
on the photo crops themselves. ``margins`` asks how decided the float model is on the crops
(its top-1 probability and top-1 − top-2 gap) and where the recipes' quantized models disagree
with it: agreement by thirds of the gap, the float top-1 within the quantized top-5, and the
KL divergence from the float model's predictions. ``squant`` adds SQuant's data-free rounding
(``@ptq.SQuant()``) before bias correction.
"""

import copy
import glob
import json
import sys
import time
from functools import partial

import torch
from lite1_setup import lite1_and_crops
from safetensors.torch import load_file

from dfqkit.ptq import BiasCorrection, CrossLayerEqualization, SQuant, quantize_with
from dfqkit.quant.act_lsq import LSQActQuantizer
from dfqkit.quant.act_minmax import MinMaxActQuantizer
from dfqkit.quant.api import set_quant_mode
from dfqkit.quant.config import QuantConfig
from dfqkit.quant.modules import QuantConv2d, QuantLinear
from dfqkit.quant.weight_adaround import AdaRoundWeightQuantizer
from dfqkit.quant.weight_minmax import MinMaxWeightQuantizer
from dfqkit.quant.weight_symmetric import SymmetricWeightQuantizer

torch.set_num_threads(1)
torch.manual_seed(0)
out = sys.argv[1]
synth_dir = sys.argv[2]
only = sys.argv[3].split(",") if len(sys.argv) > 3 else None
mode = sys.argv[4] if len(sys.argv) > 4 else "round1"
if mode not in ("round1", "round2", "round3", "margins", "squant", "stem"):
    sys.exit(
        f"unknown grid {mode!r}: give round2, round3, margins, squant, stem, or nothing for the "
        "first"
    )
teacher, imgs, ntest = lite1_and_crops()
with torch.no_grad():
    ref = torch.cat([teacher(imgs[i : i + 32]).argmax(-1) for i in range(0, len(imgs), 32)])
synth = torch.cat(
    [load_file(f)["images"] for f in sorted(glob.glob(synth_dir + "/batch_*.safetensors"))]
)
print("crops", imgs.shape, "synthetic", synth.shape, flush=True)
example = imgs[:2]


def agree(model):
    with torch.no_grad():
        p = torch.cat([model(imgs[i : i + 32]).argmax(-1) for i in range(0, len(imgs), 32)])
    hit = (p == ref).float()
    return round(100 * hit.mean().item(), 2), round(100 * hit[-ntest:].mean().item(), 2)


@torch.no_grad()
def empirical_bc(student, images):
    """Match every quantized layer's per-channel output mean on ``images`` to the float
    model's, in execution order (one float and one quantized pass; each correction is applied
    to the layer's output at once, so the layers after it see the corrected input)."""
    names = [n for n, m in student.named_modules() if isinstance(m, QuantConv2d | QuantLinear)]
    floats, quants = dict(teacher.named_modules()), dict(student.named_modules())
    target, hooks = {}, []

    def channel_mean(o):
        return o.mean(dim=(0, 2, 3)) if o.dim() == 4 else o.mean(0)

    def record(n):
        return lambda m, i, o: target.__setitem__(n, channel_mean(o))

    def correct(n):
        def hook(m, i, o):
            d = target[n] - channel_mean(o)
            if m.bias is None:
                m.bias = torch.nn.Parameter(d.clone(), requires_grad=False)
            else:
                m.bias.add_(d)
            return o + (d.view(1, -1, 1, 1) if o.dim() == 4 else d)

        return hook

    hooks = [floats[n].register_forward_hook(record(n)) for n in names]
    teacher(images)
    for h in hooks:
        h.remove()
    hooks = [quants[n].register_forward_hook(correct(n)) for n in names]
    student(images)
    for h in hooks:
        h.remove()


def margin_report(name, student):
    with torch.no_grad():
        lf = torch.cat([teacher(imgs[i : i + 32]) for i in range(0, len(imgs), 32)])
        lq = torch.cat([student(imgs[i : i + 32]) for i in range(0, len(imgs), 32)])
    p = lf.softmax(-1)
    top2 = p.topk(2, -1).values
    gap = top2[:, 0] - top2[:, 1]
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    hit = (lq.argmax(-1) == lf.argmax(-1)).float()
    order = gap.argsort()
    n = len(order)
    rec = dict(
        name=name,
        float_top1_prob_q10_25_50_75_90=[round(x, 3) for x in p.amax(-1).quantile(q).tolist()],
        float_gap_q10_25_50_75_90=[round(x, 3) for x in gap.quantile(q).tolist()],
        agree_all=round(100 * hit.mean().item(), 2),
        agree_by_gap_third=[
            round(100 * hit[order[i * n // 3 : (i + 1) * n // 3]].mean().item(), 1)
            for i in range(3)
        ],
        float_top1_in_quant_top5=round(
            100
            * (lq.topk(5, -1).indices == lf.argmax(-1, keepdim=True)).any(-1).float().mean().item(),
            1,
        ),
        kl_float_to_quant=round(
            torch.nn.functional.kl_div(
                lq.log_softmax(-1), lf.log_softmax(-1), log_target=True, reduction="batchmean"
            ).item(),
            4,
        ),
    )
    print(json.dumps(rec), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def run(
    name,
    w,
    a,
    *,
    calib="synthetic",
    weight="minmax_pc",
    transforms=(),
    first_last=None,
    act="minmax",
    policy="after_relu",
    second=None,
    ebc=None,
    margins=False,
    layer_bits=None,
):
    wq = {
        "minmax_pc": partial(MinMaxWeightQuantizer, per_channel=True),
        "minmax_pt": partial(MinMaxWeightQuantizer, per_channel=False),
        "sym_pc": partial(SymmetricWeightQuantizer, per_channel=True),
        "mse_pc": partial(AdaRoundWeightQuantizer, init="mse"),
    }[weight]
    aq = {
        "minmax": MinMaxActQuantizer,
        "lsq_mse": partial(LSQActQuantizer, init="mse", search_elements=2**18),
    }[act]
    cfg = QuantConfig(
        w_bits=w,
        a_bits=a,
        weight_quantizer=wq,
        act_quantizer=aq,
        policy=policy,
        first_layer_bits=first_last,
        last_layer_bits=first_last,
        second_input_bits=second,
        layer_bits=layer_bits,
    )
    t0 = time.perf_counter()
    tr = [
        {
            "cle": lambda: CrossLayerEqualization(relu6="relu"),
            "clek": CrossLayerEqualization,
            "bc": BiasCorrection,
            "sq": SQuant,
        }[t]()
        for t in transforms
    ]
    s = quantize_with(copy.deepcopy(teacher), cfg, example, tr).eval()
    set_quant_mode(s, "observe")
    with torch.no_grad():
        if calib == "synthetic":
            for i in range(0, len(synth), 16):
                s(synth[i : i + 16])
        else:
            g = torch.Generator().manual_seed(0)
            for _ in range(8):
                s(torch.randn(16, 3, 240, 240, generator=g))
    set_quant_mode(s, "frozen")
    if ebc == "synthetic":
        empirical_bc(s, synth)
    elif ebc == "crops":
        empirical_bc(s, imgs[:128])  # the val crops: an upper bound, not data-free
    if margins:
        return margin_report(name, s)
    all_, test = agree(s)
    rec = dict(
        name=name,
        w=w,
        a=a,
        calib=calib,
        weight=weight,
        act=act,
        policy=policy,
        transforms=list(transforms),
        first_last=first_last,
        second=second,
        layer_bits=layer_bits,
        ebc=ebc,
        agree_all=all_,
        agree_test=test,
        seconds=round(time.perf_counter() - t0, 1),
    )
    print(json.dumps(rec), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")


grid = []
for w, a in [(8, 8), (6, 6), (4, 8), (4, 4)]:
    grid += [
        (f"noise W{w}A{a}", w, a, dict(calib="noise")),
        (f"zeroq W{w}A{a}", w, a, dict()),
        (f"zeroq+bc W{w}A{a}", w, a, dict(transforms=("bc",))),
        (f"zeroq+cle(relu)+bc W{w}A{a}", w, a, dict(transforms=("cle", "bc"))),
        (f"zeroq+cle(keep)+bc W{w}A{a}", w, a, dict(transforms=("clek", "bc"))),
        (f"zeroq 8bit-fl W{w}A{a}", w, a, dict(first_last=8)),
        (f"zeroq+bc 8bit-fl W{w}A{a}", w, a, dict(first_last=8, transforms=("bc",))),
        (f"zeroq sym W{w}A{a}", w, a, dict(weight="sym_pc")),
        (f"zeroq per-tensor W{w}A{a}", w, a, dict(weight="minmax_pt")),
    ]
if mode == "round2":
    grid = []
    for w, a in [(6, 6), (4, 8), (4, 4)]:
        gq = dict(weight="mse_pc", act="lsq_mse", policy="layer_inputs", first_last=8, second=8)
        grid += [
            (
                f"sym+bc 8bit-fl W{w}A{a}",
                w,
                a,
                dict(weight="sym_pc", first_last=8, transforms=("bc",)),
            ),
            (
                f"mse-w+bc 8bit-fl W{w}A{a}",
                w,
                a,
                dict(weight="mse_pc", first_last=8, transforms=("bc",)),
            ),
            (f"genie-quant W{w}A{a}", w, a, gq),
            (f"genie-quant+bc W{w}A{a}", w, a, dict(gq, transforms=("bc",))),
            (
                f"mse-w lsq-a after_relu+bc 8bit-fl W{w}A{a}",
                w,
                a,
                dict(weight="mse_pc", act="lsq_mse", first_last=8, transforms=("bc",)),
            ),
        ]
if mode == "round3":
    fl_bc = dict(first_last=8, transforms=("bc",))
    grid = [
        ("bc 8bit-fl W6A8", 6, 8, fl_bc),
        ("bc 8bit-fl W8A6", 8, 6, fl_bc),
        ("mse-w+bc 8bit-fl W6A8", 6, 8, dict(fl_bc, weight="mse_pc")),
        ("lsq-a+bc 8bit-fl W8A6", 8, 6, dict(fl_bc, act="lsq_mse")),
    ]
    for w, a in [(6, 6), (4, 8)]:
        grid += [
            (
                f"empirical-bc(synthetic) 8bit-fl W{w}A{a}",
                w,
                a,
                dict(first_last=8, ebc="synthetic"),
            ),
            (f"bc+empirical-bc(synthetic) 8bit-fl W{w}A{a}", w, a, dict(fl_bc, ebc="synthetic")),
            (f"bc+empirical-bc(val crops) 8bit-fl W{w}A{a}", w, a, dict(fl_bc, ebc="crops")),
        ]
if mode == "squant":
    grid = []
    for w, a in [(6, 6), (4, 8), (4, 4), (6, 8), (8, 8)]:
        grid += [
            (f"squant+bc 8bit-fl W{w}A{a}", w, a, dict(first_last=8, transforms=("sq", "bc"))),
            (f"squant 8bit-fl W{w}A{a}", w, a, dict(first_last=8, transforms=("sq",))),
            (
                f"squant+bc 8bit-fl lsq-a W{w}A{a}",
                w,
                a,
                dict(first_last=8, transforms=("sq", "bc"), act="lsq_mse"),
            ),
        ]
if mode == "stem":
    # where the per-layer sensitivity (docs/scripts/lite1_sensitivity.py) puts the 6-bit loss:
    # the stem's output activation and the first depthwise convolution's weights
    fl_bc = dict(first_last=8, transforms=("bc",))
    dw8 = {"blocks.0.0.conv_dw": 8}
    grid = []
    for w, a in [(6, 6), (4, 8), (4, 4)]:
        grid += [
            (f"bc 8bit-fl stem-out-8 W{w}A{a}", w, a, dict(fl_bc, second=8)),
            (f"bc 8bit-fl dw0-8 W{w}A{a}", w, a, dict(fl_bc, layer_bits=dw8)),
            (f"bc 8bit-fl stem-out-8 dw0-8 W{w}A{a}", w, a, dict(fl_bc, second=8, layer_bits=dw8)),
            (
                f"mse-w lsq-a bc 8bit-fl stem-out-8 dw0-8 W{w}A{a}",
                w,
                a,
                dict(fl_bc, second=8, layer_bits=dw8, weight="mse_pc", act="lsq_mse"),
            ),
        ]
if mode == "margins":
    fl_bc = dict(first_last=8, transforms=("bc",), margins=True)
    grid = [(f"bc 8bit-fl W{w}A{a}", w, a, fl_bc) for w, a in [(8, 8), (6, 6), (4, 8), (4, 4)]]
for name, w, a, kw in grid:
    if only and not any(o in name for o in only):
        continue
    run(name, w, a, **kw)
