"""The CPU path (recipes/cpu/): EfficientNet-Lite1 with its real ImageNet weights, quantized
data-free by each method family and evaluated by agreement on crops of scikit-learn's photos,
end to end at a tiny budget."""

import json

import pytest

from dfqkit.train import run

TINY = ["EVAL_IMAGES = 4", "BATCH_SIZE = 2", "train.naive_batches = 1"]
GENERATOR = ["EPOCHS = 2", "ITERS_PER_EPOCH = 1", "train.warmup_epochs = 1",
             "train.calib_epochs = 1"]  # fmt: skip
PTQ = ["SYNTH_IMAGES = 4", "SYNTH_BATCH = 2", "SYNTH_ITERS = 1"]
FAMILIES = {
    "gdfq": GENERATOR,
    "diversity": GENERATOR,
    "zeroq": PTQ,
    "genie": [
        *PTQ,
        "RECON_SAMPLES = 4",
        "RECON_BATCH = 2",
        "RECON_ITERS = 1",
        "quantizers.LSQActQuantizer.search_elements = 4096",
    ],  # fmt: skip
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(FAMILIES))
def test_every_family_quantizes_lite1_on_the_cpu_path(method, tmp_path, monkeypatch):
    monkeypatch.setenv("DFQKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / method
    run([f"recipes/cpu/lite1_{method}_w4a8.gin"], [*TINY, *FAMILIES[method]], output_dir=out)
    m = json.loads((out / "metrics.json").read_text())
    assert m["w_bits"] == 4 and m["a_bits"] == 8
    # evaluated by agreement with the float teacher on the photo crops
    assert m["evaluation"] == {"data": "photo_crops", "labels": "teacher"}
    assert m["teacher"]["test_top1"] == 100.0  # the teacher agrees with itself
    assert 0 <= m["best"]["test_top1"] <= 100
    assert m["float_layers"] == []  # Conv2dSame stem and stride-2 depthwise convs included
    assert m["phase_seconds"]["references"] > 0
