"""Mode-collapse diagnostic of a run's synthetic data (the paper's motivation).

    python -m dfqkit.diagnose --run runs/mnist_gdfq_w4a4/seed0 [--run DIR2 ...] [--batches 8]
                              [--out FILE.png] [--json FILE.json]

For each run it rebuilds the run's teacher, generator and mixer from ``DIR/config.gin``, loads
the newest complete checkpoint, synthesizes ``--batches`` batches and reports, on the teacher:

* per activation layer (every ReLU-type module, in call order) the distribution of activation
  values: a histogram and its **excess kurtosis** (0 for a Gaussian; a large value means the
  values concentrate in one sharp peak with long tails);
* the **mean pairwise cosine similarity** of the penultimate (pooled, pre-classifier) features
  of the samples of a batch (1.0: every sample looks the same to the teacher).

The same figures on real validation images are the reference. The PNG overlays, per layer,
the histograms of each run's synthetic data and of the real data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dfqkit import config as cfg
from dfqkit.generators.base import synthesize
from dfqkit.optional import require
from dfqkit.rundir import load_run
from dfqkit.taps import Taps

MAX_VALUES = 200_000  # per layer, for the histogram (a uniform subsample)


def excess_kurtosis(x: torch.Tensor) -> float:
    """``E[(x - μ)^4] / σ^4 - 3`` of all values of ``x`` (float64)."""
    x = x.double().flatten()
    centered = x - x.mean()
    var = centered.square().mean()
    if var == 0:
        return 0.0
    return float(centered.pow(4).mean() / var.square() - 3.0)


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs ``i < j`` of the rows of ``(n, d)`` features."""
    f = torch.nn.functional.normalize(features.double().flatten(1), dim=1)
    n = f.shape[0]
    sim = f @ f.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


class _Collector:
    """Accumulates per-layer activation values and per-batch feature similarities."""

    def __init__(self) -> None:
        self.values: list[list[torch.Tensor]] = []
        self.cosines: list[float] = []

    def add(self, taps: dict[str, Any]) -> None:
        acts = taps["activations"]
        if not self.values:
            self.values = [[] for _ in acts]
        for store, a in zip(self.values, acts, strict=True):
            store.append(a.detach().float().flatten().cpu())
        self.cosines.append(mean_pairwise_cosine(taps["stages"][1][0]))

    def summary(self, generator: torch.Generator) -> dict[str, Any]:
        layers = []
        for chunks in self.values:
            values = torch.cat(chunks)
            if values.numel() > MAX_VALUES:
                values = values[torch.randperm(values.numel(), generator=generator)[:MAX_VALUES]]
            layers.append({"kurtosis": excess_kurtosis(values), "values": values})
        return {
            "layers": layers,
            "mean_kurtosis": sum(la["kurtosis"] for la in layers) / len(layers),
            "pairwise_cosine": sum(self.cosines) / len(self.cosines),
        }


def diagnose_run(run_dir: Path, *, batches: int, batch_size: int | None) -> dict[str, Any]:
    """Synthetic-data statistics of one run (and of the real validation split)."""
    run = load_run(run_dir, which="last", need_checkpoint=False)
    teacher, generator, mixer = run.teacher, run.generator, run.mixer
    data, device = run.data, run.device
    b = batch_size or 64
    example = torch.zeros(2, data.channels, data.image_size, data.image_size, device=device)
    taps = Taps(teacher, {"activations", "stages"}, stage_parts=[1], example=example)
    rng = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    synthetic, real = _Collector(), _Collector()
    generator.train()  # as in training: the generator's BN uses batch statistics
    with torch.no_grad():
        for _ in range(batches):
            batch = synthesize(generator, mixer, b, device)
            with taps:
                teacher(batch.images)
            synthetic.add(taps.collect())
        for i, (images, _labels) in enumerate(data.loader("val", b)):
            if i == batches:
                break
            with taps:
                teacher(images.to(device))
            real.add(taps.collect())
    taps.remove()
    return {
        "run": str(run_dir),
        "epochs_done": run.state.epochs_done,
        "synthetic": synthetic.summary(rng),
        "real": real.summary(rng),
    }


def run_labels(runs: Sequence[str]) -> list[str]:
    """Each run's label: its directory's name, with as many parent directories as it takes to
    tell the runs apart (``seed0`` alone is ambiguous: ``mnist_gdfq_w4a4/seed0``)."""
    paths = [Path(r) for r in runs]
    for depth in range(1, max((len(p.parts) for p in paths), default=1) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def _plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    matplotlib = require("matplotlib", extra="plots", purpose="the diagnostic plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", extra="plots", purpose="the diagnostic plot")

    n_layers = len(results[0]["real"]["layers"])
    cols = min(4, n_layers)
    rows = -(-n_layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    labels = run_labels([res["run"] for res in results])
    for layer in range(n_layers):
        ax = axes[layer // cols][layer % cols]
        real = results[0]["real"]["layers"][layer]
        hi = float(real["values"].max())
        for res in results:
            hi = max(hi, float(res["synthetic"]["layers"][layer]["values"].max()))
        bins = torch.linspace(0, max(hi, 1e-6), 60).numpy()
        ax.hist(
            real["values"].numpy(),
            bins=bins,
            density=True,
            histtype="step",
            color="k",
            label=f"real (κ={real['kurtosis']:.1f})",
        )
        for res, name in zip(results, labels, strict=True):
            syn = res["synthetic"]["layers"][layer]
            ax.hist(
                syn["values"].numpy(),
                bins=bins,
                density=True,
                histtype="step",
                label=f"{name} (κ={syn['kurtosis']:.1f})",
            )
        ax.set_yscale("log")
        ax.set_title(f"activation layer {layer + 1}", fontsize=8)
        ax.legend(fontsize=6)
    for k in range(n_layers, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("teacher activation values on synthetic vs real images (κ: excess kurtosis)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None, *, prog: str = "dfqkit.diagnose") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, help="a run directory")
    parser.add_argument("--batches", type=int, default=8, help="synthesized batches per run")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64)")
    parser.add_argument("--out", default=None, help="PNG of the histograms")
    parser.add_argument("--json", default=None, help="write the figures as JSON")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        if args.batches < 1:
            raise cfg.ConfigError(f"--batches must be >= 1, got {args.batches}")
        results = [
            diagnose_run(Path(r), batches=args.batches, batch_size=args.batch) for r in args.run
        ]
    except (cfg.ConfigError, ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"{prog}: error: {cfg.one_line(err)}", file=sys.stderr)
        return 2
    rows = []
    for res in results:
        for kind in ("synthetic", "real"):
            s = res[kind]
            kurt = " ".join(f"{la['kurtosis']:.1f}" for la in s["layers"])
            rows.append(
                f"{res['run']}  {kind:9s}  pairwise cos {s['pairwise_cosine']:.3f}  "
                f"mean kurtosis {s['mean_kurtosis']:.2f}  per layer [{kurt}]"
            )
    print("\n".join(rows))
    if args.out:
        _plot(results, Path(args.out))
        print(f"histograms: {args.out}")
    if args.json:
        slim = [
            {
                "run": r["run"],
                "epochs_done": r["epochs_done"],
                **{
                    kind: {
                        "pairwise_cosine": r[kind]["pairwise_cosine"],
                        "mean_kurtosis": r[kind]["mean_kurtosis"],
                        "kurtosis": [la["kurtosis"] for la in r[kind]["layers"]],
                    }
                    for kind in ("synthetic", "real")
                },
            }
            for r in results
        ]
        Path(args.json).write_text(json.dumps(slim, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
