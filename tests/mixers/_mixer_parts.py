"""Shared by the attention-mixer tests: a tiny generator and a bound multi-layer mixer."""

import torch

from dfqkit.generators import ConditionalGenerator
from dfqkit.mixers import MultiLayerAttentionMixer


def mixer_parts(teacher, **kw):
    gen = ConditionalGenerator(num_classes=10, image_size=28, channels=1, latent_dim=16)
    kw = {"num_classes": 10, "dim": 16, "heads": 2, "flow_heads": 2, **kw}
    mixer = MultiLayerAttentionMixer(**kw)
    mixer.bind(teacher=teacher, generator=gen, example=torch.randn(2, 1, 28, 28))
    return gen, mixer
