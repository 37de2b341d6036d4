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


def test_the_cpu_fragment_keeps_lite1s_sensitive_quantizers_at_8_bits():
    """gin/quant/depthwise_relu6.gin, as the CPU recipes bind it: 8-bit first and last weights,
    the stem's output activation and the first depthwise convolution's weights at 8 bits
    (docs/cpu.md, "Where the 6-bit loss sits"); every other quantizer at the recipe's bits."""
    import gin
    import timm
    import torch

    from dfqkit import config as cfg
    from dfqkit.quant import ActQuantizer, quantize_

    cfg.parse(
        ["recipes/cpu/lite1_zeroq_w4a8.gin"],
        ["W_BITS = 6", "A_BITS = 6"],
        finalize=False,
        allow_required=True,
    )
    config = gin.query_parameter("dfqkit.train.quant").scoped_configurable_fn()
    model = timm.create_model("tf_efficientnet_lite1", pretrained=False).eval()
    student = quantize_(model, config, torch.randn(1, 3, 64, 64))
    weights = {
        n: m.weight_quant.bits for n, m in student.named_modules() if hasattr(m, "weight_quant")
    }
    acts = {n: m.bits for n, m in student.named_modules() if isinstance(m, ActQuantizer)}
    for name in ("conv_stem", "blocks.0.0.conv_dw", "classifier"):
        assert weights.pop(name) == 8, name
    assert acts.pop("bn1.act.1") == 8  # the stem's ReLU6
    assert set(weights.values()) == {6} and set(acts.values()) == {6}
