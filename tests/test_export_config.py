"""An export stores only what rebuilding its student needs, and loads without the rest."""

import torch
from safetensors import safe_open

from dfqkit.export import load_quantized, save_quantized
from dfqkit.export_config import student_config
from dfqkit.models import mnist_resnet
from dfqkit.quant import QuantConfig, quantize_, set_quant_mode

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
