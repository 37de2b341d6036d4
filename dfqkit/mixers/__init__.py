"""Mixers: act on the conditioning (``stage = "cond"``) or on the images (``stage = "image"``)."""

from dfqkit.mixers.attention_mixer import MultiLayerAttentionMixer
from dfqkit.mixers.base import STAGES, Mixer
from dfqkit.mixers.embedding_mixup import EmbeddingMixup
from dfqkit.mixers.flow_attention import AffineCouplingFlow, FlowLevelAttention, LevelTransformer
from dfqkit.mixers.level_embeddings import LevelEmbeddings
from dfqkit.mixers.mixup import ImageOnlyMixup, Mixup
from dfqkit.mixers.no_mixer import NoMixer

__all__ = [
    "STAGES",
    "AffineCouplingFlow",
    "EmbeddingMixup",
    "FlowLevelAttention",
    "ImageOnlyMixup",
    "LevelEmbeddings",
    "LevelTransformer",
    "Mixer",
    "Mixup",
    "MultiLayerAttentionMixer",
    "NoMixer",
]
