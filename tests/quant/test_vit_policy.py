import copy

import pytest
import torch
from torch import nn

from dfqkit.quant import (
    MinMaxActQuantizer,
    QuantConfig,
    QuantLinear,
    SymmetricWeightQuantizer,
    act_quantizers,
    quantize_,
    set_quant_mode,
)
from dfqkit.quant.attention import OPERAND_QUANTIZERS

timm = pytest.importorskip("timm")


def _config(w=16, a=16, **kw):
    return QuantConfig(
        w_bits=w,
        a_bits=a,
        policy="vit",
        weight_quantizer=SymmetricWeightQuantizer,
        act_quantizer=MinMaxActQuantizer,
        **kw,
    )


@pytest.fixture(scope="module")
def deit():
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3
    ).eval()


def test_vit_policy_quantizes_exactly_the_listed_tensors(deit):
    x = torch.randn(2, 3, 32, 32)
    q = quantize_(copy.deepcopy(deit), _config(), x)
    linears = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 4 * 3 + 1  # qkv, proj, fc1, fc2 per block + head
    assert all(isinstance(m.input_quant, MinMaxActQuantizer) for m in linears)
    assert q.patch_embed.proj.input_quant is None  # the image stays float by default
    for block in q.blocks:
        for name in OPERAND_QUANTIZERS:
            assert isinstance(getattr(block.attn, name), MinMaxActQuantizer)
        assert block.attn.fused_attn is False
    assert len(act_quantizers(q)) == 9 * 3 + 1
    # LayerNorm, softmax and GELU stay float: no quantizer inside them
    for m in q.modules():
        if isinstance(m, nn.LayerNorm | nn.GELU):
            assert not any(isinstance(c, MinMaxActQuantizer) for c in m.modules())


def test_intercepted_operands_are_q_k_logits_probabilities_and_v(deit):
    x = torch.randn(2, 3, 32, 32)
    q = quantize_(copy.deepcopy(deit), _config(), x)
    attn = q.blocks[0].attn
    seen = {}
    for name in OPERAND_QUANTIZERS:
        getattr(attn, name).register_forward_hook(
            lambda _m, args, _o, name=name: seen.__setitem__(name, args[0])
        )
    set_quant_mode(q, "observe")
    with torch.no_grad():
        q(x)
    heads, tokens, hd = attn.num_heads, 1 + 16, 192 // attn.num_heads
    assert seen["q_quant"].shape == (2, heads, tokens, hd)
    assert seen["k_quant"].shape == (2, heads, hd, tokens)  # kᵀ
    assert seen["logit_quant"].shape == (2, heads, tokens, tokens)
    torch.testing.assert_close(seen["prob_quant"].sum(-1), torch.ones(2, heads, tokens))
    assert seen["v_quant"].shape == (2, heads, tokens, hd)
    # the logits are q·kᵀ of the quantized operands (16 bits: ≈ the float product)
    torch.testing.assert_close(
        seen["logit_quant"], seen["q_quant"] @ seen["k_quant"], rtol=1e-3, atol=1e-3
    )


def test_fused_teacher_and_unfused_16_bit_student_agree(deit):
    assert deit.blocks[0].attn.fused_attn  # the teacher takes timm's fused SDPA path
    x = torch.randn(2, 3, 32, 32)
    q = quantize_(copy.deepcopy(deit), _config(), x)
    set_quant_mode(q, "observe")
    with torch.no_grad():
        torch.testing.assert_close(q(x), deit(x), rtol=1e-3, atol=1e-3)


def test_swin_window_attention_with_bias_and_mask():
    torch.manual_seed(0)
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=56,
        depths=(2, 1, 1, 1),
        window_size=7,
    ).eval()
    x = torch.randn(1, 3, 56, 56)
    q = quantize_(copy.deepcopy(swin), _config(), x)
    n_attn = sum(hasattr(m, "logit_quant") for m in q.modules())
    assert n_attn == 5
    set_quant_mode(q, "observe")
    with torch.no_grad():
        torch.testing.assert_close(q(x), swin(x), rtol=1e-3, atol=1e-3)


def test_w4a8_changes_the_output_and_a_cnn_is_refused(deit):
    x = torch.randn(2, 3, 32, 32)
    q = quantize_(copy.deepcopy(deit), _config(4, 8), x)
    set_quant_mode(q, "observe")
    with torch.no_grad():
        assert (q(x) - deit(x)).abs().max() > 1e-2
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    cnn(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="no timm-style attention module"):
        quantize_(cnn, _config(), torch.randn(1, 3, 8, 8))


def test_symmetric_weight_codes_by_hand():
    q = SymmetricWeightQuantizer(bits=4)
    w = torch.tensor([[1.5, -0.3, 0.2], [-0.75, 0.1, 0.25]])
    codes, scale = q.codes(w)
    # row 0: s = 1.5 / 7.5 = 0.2 → 7.5 rounds (half to even) to 8, clamped to 7; -1.5 → -2; 1
    # row 1: s = 0.75 / 7.5 = 0.1 → -7.5 → -8 (in range); 1; 2.5 → 2
    torch.testing.assert_close(scale.flatten(), torch.tensor([0.2, 0.1]))
    assert codes.tolist() == [[7.0, -2.0, 1.0], [-8.0, 1.0, 2.0]]
    torch.testing.assert_close(q(w), codes * scale)
