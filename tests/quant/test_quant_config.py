import gin
import pytest

from dfqkit.quant import EMAActQuantizer, MinMaxActQuantizer, QuantConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"w_bits": 1, "a_bits": 4}, "w_bits must be in 2..16, got 1"),
        ({"w_bits": 4, "a_bits": 17}, "a_bits must be in 2..16, got 17"),
        ({"w_bits": 4, "a_bits": 4, "first_layer_bits": 32}, "first_layer_bits must be in"),
        ({"w_bits": 4.0, "a_bits": 4}, "w_bits must be an int in 2..16, got 4.0"),
        ({"w_bits": True, "a_bits": 4}, "w_bits must be an int"),
        ({"w_bits": 4, "a_bits": 4, "act_quantizer": "ema"}, "act_quantizer must be a quantizer"),
        ({"w_bits": 4, "a_bits": 4, "quantize_input": 1}, "quantize_input must be a bool"),
        ({"w_bits": 4, "a_bits": 4, "relu_types": (int,)}, "relu_types must be"),
    ],
)
def test_invalid_fields_name_field_value_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_unknown_policy_suggests_close_match():
    with pytest.raises(ValueError) as info:
        QuantConfig(w_bits=4, a_bits=4, policy="after_relus")
    assert "'after_relu', 'layer_inputs'" in str(info.value)
    assert "got 'after_relus'. Did you mean 'after_relu'?" in str(info.value)


def test_defaults_and_layer_bits():
    config = QuantConfig(w_bits=4, a_bits=6, first_layer_bits=8)
    assert config.act_quantizer is EMAActQuantizer and config.policy == "after_relu"
    assert config.weight_bits(first=True) == 8 and config.weight_bits(last=True) == 4
    assert config.input_bits() == 6 and config.input_bits(first=True) == 8
    with pytest.raises(AttributeError):
        config.w_bits = 2  # frozen


def test_gin_binds_config_and_quantizer_factory():
    gin.parse_config(
        """
        W_BITS = 3
        quant.QuantConfig.w_bits = %W_BITS
        quant.QuantConfig.a_bits = 5
        quant.QuantConfig.act_quantizer = @quantizers.MinMaxActQuantizer
        quantizers.MinMaxActQuantizer.ste = 'clipped'
        """
    )
    config = gin.get_configurable("quant.QuantConfig")()
    assert (config.w_bits, config.a_bits) == (3, 5)
    quantizer = config.act_quantizer(bits=config.a_bits)
    assert isinstance(quantizer, MinMaxActQuantizer)
    assert (quantizer.bits, quantizer.ste) == (5, "clipped")
