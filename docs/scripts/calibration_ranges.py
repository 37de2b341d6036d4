"""Where a run's calibrated activation ranges cost accuracy: run a recipe's calibration epochs
only (``EPOCHS`` = the warm-up, no student step), then, on the calibrated student:

* each activation quantizer's observed range beside the range of its input on real validation
  images (min, 99.9th percentile, max), with the weights and every other range unchanged;
* test top-1 as calibrated, with **one** quantizer's upper bound set to the real maximum (each in
  turn), and with every upper bound set to the real maximum;
* the pixel range of the generator's images beside the real images'.

Real images are read only for this diagnosis; nothing goes back into the run. Results:
docs/methods/diversity.md ("Why the method's calibrated student starts low").

    python docs/scripts/calibration_ranges.py --gin recipes/mnist/diversity_w4a3.gin --seed 0 \
        --out runs/calib_div_w4a3 [--gin_param "LAMBDA1 = 0.0"]
"""

import argparse
import json

import torch

from dfqkit.evaluate import evaluate
from dfqkit.generators.base import synthesize
from dfqkit.quant import act_quantizers
from dfqkit.train import fit, start_run

parser = argparse.ArgumentParser()
parser.add_argument("--gin", required=True)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", required=True)
parser.add_argument("--gin_param", action="append", default=[])
parser.add_argument("--batches", type=int, default=4, help="real validation batches read")
args = parser.parse_args()

torch.set_num_threads(1)
run, _ = start_run([args.gin], [f"SEED = {args.seed}", *args.gin_param], output_dir=args.out)
warmup = run.schedule.warmup_epochs
if run.schedule.epochs != warmup:
    raise SystemExit(f"set EPOCHS = {warmup} (the warm-up) and train.lr_milestones = []")
fit(run)
student = run.student_module
named = {id(q): n for n, q in student.named_modules()}
quantizers = list(act_quantizers(student))
seen: dict[int, list[torch.Tensor]] = {id(q): [] for q in quantizers}
hooks = [
    q.register_forward_pre_hook(lambda mod, a: seen[id(mod)].append(a[0].detach().flatten()))
    for q in quantizers
]
torch.set_grad_enabled(False)
student.eval()
real_images = []
for i, (x, _) in enumerate(run.loaders["val"]):
    if i == args.batches:
        break
    real_images.append(x)
    student(x)
for h in hooks:
    h.remove()


def test() -> float:
    return evaluate(student, run.loaders["test"])["top1"]


report = {"recipe": args.gin, "seed": args.seed, "calibrated_test": test(), "layers": []}
calibrated = [(q.lo.detach().clone(), q.hi.detach().clone()) for q in quantizers]
real_max = []
for q, (lo, hi) in zip(quantizers, calibrated, strict=True):
    v = torch.cat(seen[id(q)])
    real_max.append(float(v.max()))
    sample = v[torch.randperm(v.numel())[:1_000_000]]
    report["layers"].append({
        "name": named[id(q)], "lo": float(lo), "hi": float(hi), "real_min": float(v.min()),
        "real_q999": float(sample.quantile(0.999)), "real_max": real_max[-1],
    })  # fmt: skip
layers = report["layers"]
for layer, q, (_, hi), top in zip(layers, quantizers, calibrated, real_max, strict=True):
    q.hi.copy_(torch.tensor(top))
    layer["test_with_real_max"] = test()
    q.hi.copy_(hi)
for q, top in zip(quantizers, real_max, strict=True):
    q.hi.copy_(torch.tensor(top))
report["test_all_real_max"] = test()
images = torch.cat([synthesize(run.generator, run.mixer, 64, run.device).images for _ in range(4)])
real = torch.cat(real_images)
report["pixels_generated"] = {"min": float(images.min()), "max": float(images.max())}
report["pixels_real"] = {"min": float(real.min()), "max": float(real.max())}
print(json.dumps(report, indent=1))
