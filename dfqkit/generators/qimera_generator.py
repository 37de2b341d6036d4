"""Qimera's generator: class embeddings added to the noise and normalised, GDFQ's decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfqkit.generators.conditional_generator import ConditionalGenerator
from dfqkit.registry import register
from dfqkit.step import SynthBatch

CBN_MIXES = ("sum", "mean")
EMBEDDING_INITS = ("teacher", "random")
INPUT_NORMS = ("sample", "feature")


def classifier_layer(teacher: nn.Module, num_classes: int) -> nn.Linear:
    """The teacher's final ``nn.Linear`` producing ``num_classes`` logits."""
    found = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
    found = [m for m in found if m.out_features == num_classes]
    if not found:
        raise ValueError(
            f"{type(teacher).__name__} has no nn.Linear with {num_classes} outputs to "
            "initialise the class embeddings from; use embedding_init='random'"
        )
    return found[-1]


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """``BatchNorm1d`` without affine or running statistics over channel dim 1 of ``(n, c[, l])``:
    each channel minus its mean, over its biased standard deviation (eps 1e-5)."""
    return F.batch_norm(x, None, None, training=True, eps=1e-5)


@register("generators")
class QimeraGenerator(ConditionalGenerator):
    """GDFQ's decoder fed with the normalised ``Emb(y) + noise_scale · z``.

    ``input_norm="sample"`` (the official code: ``BatchNorm1d`` applied to the transposed
    ``(b, d)`` input) standardises each sample over its ``d`` features; for a superposed batch
    ``(b, K, d)`` (transposed to ``(d, K, b)``) each of the ``K`` slots is standardised over all
    samples and features. ``input_norm="feature"`` (dfqkit before 0.2) standardises each feature
    over the batch instead.

    The class embedding has the width of the teacher's classifier input and is by default
    initialised from the teacher's classifier weight rows (``embedding_init="teacher"``,
    optionally frozen); an optional "disentanglement mapping" ``Linear(latent_dim, 100)`` sits
    before the decoder. With :class:`~dfqkit.mixers.EmbeddingMixup` a mixed sample's input is
    ``Σ_k λ_k · embed(y_k, z_k)``; with ``conditioning="cbn"`` (ImageNet) the conditional BN
    layers are driven by the soft targets ``Σ_k λ_k onehot(y_k)``: a mixed sample's ``γ, β`` are
    the λ-weighted sum of its classes' (``cbn_mix="sum"``, the default). The official code
    divides that sum by ``K`` (``cbn_mix="mean"``), which for its ImageNet ``K`` of 100 to 500
    shrinks a mixed sample's ``γ`` and ``β`` a hundredfold or more against an unmixed one's;
    dfqkit's default keeps them a convex combination (docs/methods.md, "Decisions").

    Reference: Choi et al., "Qimera", NeurIPS 2021 (official run scripts: latent 64 CIFAR, 512
    ResNet-18, 2048 ResNet-50, 1280 MobileNetV2; the mapping is off by default in the official
    scripts because of its inverted ``--no_DM`` flag).

    Args:
        num_classes, image_size, channels, bn_eps, width: as :class:`ConditionalGenerator`.
        latent_dim: width of the embedding and of ``z`` (the teacher's classifier input width
            when ``embedding_init="teacher"``).
        conditioning: ``"embed"`` (the embedding carries the class) or ``"cbn"`` (also
            categorical conditional BN in the decoder).
        embedding_init: ``"teacher"`` (classifier weight rows, at bind time) or ``"random"``.
        freeze_embedding: keep the embedding fixed.
        mapping: add the ``Linear(latent_dim, 100)`` mapping before the decoder.
        noise_scale: multiplies ``z`` before it is added to the embedding.
        cbn_mix: ``"sum"`` (``Σ_k λ_k γ_{y_k}``) or ``"mean"`` (the official ``/K``, with ``K``
            the number of classes in the sample; unmixed samples are unchanged).
        input_norm: ``"sample"`` (official) or ``"feature"`` (see above).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int = 32,
        channels: int = 3,
        latent_dim: int = 64,
        conditioning: str = "embed",
        embedding_init: str = "teacher",
        freeze_embedding: bool = False,
        mapping: bool = False,
        noise_scale: float = 1.0,
        bn_eps: float = 0.8,
        width: int = 128,
        cbn_mix: str = "sum",
        input_norm: str = "sample",
    ) -> None:
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
        if cbn_mix not in CBN_MIXES:
            raise ValueError(f"cbn_mix must be one of {CBN_MIXES}, got {cbn_mix!r}")
        if conditioning not in ("embed", "cbn"):
            raise ValueError(f"conditioning must be 'embed' or 'cbn', got {conditioning!r}")
        if embedding_init not in EMBEDDING_INITS:
            raise ValueError(
                f"embedding_init must be one of {EMBEDDING_INITS}, got {embedding_init!r}"
            )
        decoder_in = 100 if mapping else latent_dim
        super().__init__(
            num_classes=num_classes,
            image_size=image_size,
            channels=channels,
            latent_dim=decoder_in,
            conditioning="cbn" if conditioning == "cbn" else "embed_mul",
            bn_eps=bn_eps,
            width=width,
        )
        self.latent_dim = latent_dim  # the width of z and of the embedding
        self.qimera_conditioning = conditioning
        self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.label_emb.weight.requires_grad_(not freeze_embedding)
        self.embedding_init = embedding_init
        self.input_norm = nn.BatchNorm1d(latent_dim, affine=False, track_running_stats=False)
        self.mapping = nn.Linear(latent_dim, 100) if mapping else nn.Identity()
        self.noise_scale = float(noise_scale)
        self._initialised = embedding_init == "random"
        self.cbn_mix = cbn_mix
        self.input_norm_mode = input_norm

    def bind(self, *, teacher: nn.Module, generator: nn.Module, example: torch.Tensor) -> None:
        """Copy the teacher's classifier weight rows into the embedding (``"teacher"`` init)."""
        if self._initialised:
            return
        fc = classifier_layer(teacher, self.num_classes)
        if fc.in_features != self.latent_dim:
            raise ValueError(
                f"QimeraGenerator.latent_dim={self.latent_dim} must equal the teacher "
                f"classifier's input width ({fc.in_features}) to initialise the embeddings from "
                "it; set latent_dim to it or embedding_init='random'"
            )
        with torch.no_grad():
            self.label_emb.weight.copy_(fc.weight.detach().to(self.label_emb.weight.device))
        self._initialised = True

    def embed(self, labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``(b,)`` labels and ``(b, d)`` latents → the ``(b, d)`` normalised input."""
        x = self.label_emb(labels) + self.noise_scale * z
        if self.input_norm_mode == "feature":
            return self.input_norm(x)
        return _standardise(x.T).T  # each sample over its features (official)

    def embed_slots(self, labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``(b, K)`` labels and ``(b, K, d)`` latents of a superposition → the normalised
        ``(b, K, d)`` inputs (official: each slot over all samples and features)."""
        b, k, d = z.shape
        x = self.label_emb(labels) + self.noise_scale * z
        if self.input_norm_mode == "feature":
            return self.input_norm(x.flatten(0, 1)).view(b, k, d)
        return _standardise(x.permute(2, 1, 0)).permute(2, 1, 0)

    def decode(self, batch: SynthBatch) -> torch.Tensor:
        batch = batch.replace(cond=self.mapping(batch.cond))
        if self.cbn_mix == "mean" and self.conditioning == "cbn" and batch.targets is not None:
            # the official λ-weighted mean: each sample's weights divided by its class count
            t = batch.targets
            batch = batch.replace(targets=t / (t > 0).sum(dim=1, keepdim=True).clamp(min=1))
        return super().decode(batch)
