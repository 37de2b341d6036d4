"""An export stores only what rebuilding its student needs, and loads without the rest."""

import pytest
import torch
from safetensors import safe_open

from dfqkit.export import load_quantized, save_quantized
from dfqkit.export_config import student_config
from dfqkit.export_onnx import export_model_onnx
from dfqkit.models import mnist_resnet
from dfqkit.quant import QuantConfig, act_quantizers, quantize_, set_quant_mode
from dfqkit.quant.modules import QuantConv2d

ort = pytest.importorskip("onnxruntime")

# An operative configuration of a run whose mixer and loss came from the user's own module,
# which is not importable where the export is loaded.
OPERATIVE = """
import my_training_components
from dfqkit import models

# Macros:
# ==============================================================================
A_BITS = {a_bits}
MIX_ALPHA = 0.3
W_BITS = {w_bits}

# Parameters for my_training_components.UserMixer:
# ==============================================================================
UserMixer.alpha = %MIX_ALPHA
student/UserLoss.weight = 2.0

mnist_resnet.depth = 8
mnist_resnet.weights = 'zoo'
student/mnist_resnet.width = 64

QuantConfig.a_bits = %A_BITS
QuantConfig.w_bits = %W_BITS
QuantConfig.act_quantizer = @quantizers.EMAActQuantizer
EMAActQuantizer.momentum = 0.5
LSQActQuantizer.init = 'minmax'

train.losses = [@student/losses.UserLoss()]
train.mixer = @mixers.UserMixer()
train.quant = @quant.QuantConfig()
train.teacher = @models.mnist_resnet()
"""


def test_student_config_keeps_what_the_teacher_and_quantization_reach():
    text = student_config(OPERATIVE.format(w_bits=4, a_bits=4))
    lines = set(text.splitlines())
    assert lines == {
        "from dfqkit import models",
        "A_BITS = 4",
        "W_BITS = 4",
        "mnist_resnet.depth = 8",
        "mnist_resnet.weights = 'zoo'",
        "QuantConfig.a_bits = %A_BITS",
        "QuantConfig.w_bits = %W_BITS",
        "QuantConfig.act_quantizer = @quantizers.EMAActQuantizer",
        "EMAActQuantizer.momentum = 0.5",
        "train.quant = @quant.QuantConfig()",
        "train.teacher = @models.mnist_resnet()",
    }  # no mixer, loss, their macro or module; no binding in a scope nothing opened
    assert student_config(text) == text  # idempotent: a reduced file reduces to itself


def test_an_export_whose_run_used_unimportable_training_components_still_loads(tmp_path):
    """W9 and W16 too: their codes travel in int16 (an int8 container clamped them and moved
    the logits by up to 223) and the loaded student equals the saved one bit for bit."""
    for w_bits, a_bits in ((4, 4), (9, 8), (16, 16)):
        torch.manual_seed(w_bits)
        config = QuantConfig(w_bits=w_bits, a_bits=a_bits)
        student = quantize_(mnist_resnet(weights=None), config, torch.zeros(2, 1, 28, 28))
        set_quant_mode(student, "observe")
        with torch.no_grad():
            student.eval()(torch.randn(16, 1, 28, 28))
        set_quant_mode(student, "frozen")
        out = save_quantized(
            student,
            tmp_path / f"w{w_bits}.safetensors",
            operative_config=OPERATIVE.format(w_bits=w_bits, a_bits=a_bits),
            input_shape=(1, 28, 28),
        )
        with safe_open(str(out), framework="pt") as f:
            stored = f.metadata()["operative_config"]
            codes = f.get_tensor("output.weight.codes")
        assert "Mixer" not in stored and "UserLoss" not in stored and "my_training" not in stored
        assert codes.dtype == (torch.int8 if w_bits <= 8 else torch.int16)
        loaded = load_quantized(out)
        images = torch.randn(6, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(loaded(images), student(images))


TINY = """
W_BITS = {w_bits}
A_BITS = {a_bits}
mnist_resnet.width = 4
QuantConfig.w_bits = %W_BITS
QuantConfig.a_bits = %A_BITS
train.teacher = @models.mnist_resnet()
train.quant = @quant.QuantConfig()
"""


@pytest.mark.parametrize("bits", [*range(2, 9), 12])
def test_load_quantized_is_bit_exact_on_random_ranges_and_one_sign_channels(tmp_path, bits):
    """The safetensors round trip through load_quantized, on activation ranges that exclude 0
    and weight channels that are all positive or all negative."""
    gen = torch.Generator().manual_seed(bits)
    config = QuantConfig(w_bits=bits, a_bits=bits)
    student = quantize_(mnist_resnet(width=4, weights=None), config, torch.zeros(2, 1, 28, 28))
    with torch.no_grad():
        for module in student.modules():
            if isinstance(module, QuantConv2d):
                module.weight[0].abs_().add_(0.05)
                module.weight[1].abs_().neg_().sub_(0.05)
        for quantizer in act_quantizers(student):
            lo, width = torch.rand(2, generator=gen).tolist()
            lo = [-lo, lo, 0.0][int(torch.randint(3, (), generator=gen))]  # often excludes 0
            quantizer.lo.fill_(lo)
            quantizer.hi.fill_(lo + 0.1 + 4 * width)
            quantizer.num_updates.fill_(1)
            quantizer._updates = 1
    set_quant_mode(student, "frozen")
    student.eval()
    out = save_quantized(
        student,
        tmp_path / "s.safetensors",
        operative_config=TINY.format(w_bits=bits, a_bits=bits),
        input_shape=(1, 28, 28),
    )
    loaded = load_quantized(out)
    images = torch.randn(8, 1, 28, 28, generator=gen)
    with torch.no_grad():
        want = student(images)
        assert torch.equal(loaded(images), want)
    # and a loaded student exports to ONNX like the trained one (its weights as codes)
    path = export_model_onnx(loaded, torch.zeros(1, 1, 28, 28), tmp_path / "s.onnx")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
