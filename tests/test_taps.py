import copy

import pytest
import torch

from dfqkit.models.mnist_resnet import mnist_resnet
from dfqkit.models.mnist_vit import mnist_vit
from dfqkit.quant import MinMaxActQuantizer, QuantConfig, act_quantizers, quantize_
from dfqkit.taps import Taps, quantized_activation_calls


def _pair(model, policy):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    cfg = QuantConfig(w_bits=16, a_bits=16, policy=policy, act_quantizer=MinMaxActQuantizer)
    student = quantize_(copy.deepcopy(model), cfg, x)
    before = [q.num_updates.item() for q in act_quantizers(student)]
    teacher_taps = Taps(model, {"activations"})
    student_taps = Taps(student, {"activations"}, example=x)
    assert [q.num_updates.item() for q in act_quantizers(student)] == before  # dry run undone
    with torch.no_grad():
        with teacher_taps:
            model(x)
        with student_taps:
            student(x)
    return student, teacher_taps.collect()["activations"], student_taps.collect()["activations"]


@pytest.mark.parametrize(
    ("factory", "policy", "pairs"),
    [(mnist_resnet, "after_relu", 7), (mnist_vit, "vit", 4)],
)
def test_student_activation_taps_pair_with_the_teachers(factory, policy, pairs):
    model = factory(weights=None).eval()
    student, teacher, quantized = _pair(model, policy)
    assert len(teacher) == len(quantized) == pairs
    for t, q in zip(teacher, quantized, strict=True):  # 16 bits: the same values
        torch.testing.assert_close(q, t, rtol=1e-3, atol=1e-3)
    if policy == "vit":  # the fc2 input quantizers of the 4 blocks, among 37
        assert quantized_activation_calls(student, torch.randn(2, 1, 28, 28)) == [8, 17, 26, 35]


def test_stages_tap_records_pooled_part_ends():
    torch.manual_seed(0)
    model = mnist_resnet(weights=None).eval()
    x = torch.randn(3, 1, 28, 28)
    taps = Taps(model, {"stages"}, stage_parts=[1, 3], example=x)
    outputs = {}
    for name in ("features.stage1.unit1", "features.stage2.unit1", "features.stage3.unit1"):
        model.get_submodule(name).register_forward_hook(
            lambda _m, _a, o, name=name: outputs.__setitem__(name, o.mean((2, 3)))
        )
    with torch.no_grad(), taps:
        model(x)
    stages = taps.collect()["stages"]
    assert set(stages) == {1, 3}
    torch.testing.assert_close(stages[1][0], outputs["features.stage3.unit1"])
    for got, name in zip(stages[3], sorted(outputs), strict=True):
        torch.testing.assert_close(got, outputs[name])
