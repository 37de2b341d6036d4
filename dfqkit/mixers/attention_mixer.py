"""The paper's multi-layer feature mixer with attention-derived soft labels (components (a)-(b)).

Per sample, ``c`` classes are drawn (the sample's own label first); at every level ``j`` a
learned token ``O^0`` attends over the level embeddings of those classes; the head- and
level-averaged attention scores ``σ`` are the sample's soft target ``Σ_i σ_i onehot(k_i)``, so
the generator loss trains the mixing weights (instead of Mixup's random λ) and gradients reach
``σ`` and ``O^0``. The mixed level tokens ``m^j`` then pass the normalizing-flow attention over
levels and ``B`` Transformer blocks; the pooled result is the generator's conditioning.

Every part can be switched off by one binding (the paper's sensitivity-study convention):

* ``levels = 0``: no multi-level embeddings; one learned class-embedding table instead
  (trained by the generator loss, like GDFQ's label embedding);
* ``heads = 0``: no attention mixer; Qimera's random coefficients ``softmax(N(0, I_c))``;
* ``flow_steps = 0``: no flow attention; tokens ``t^j = m^j + z``;
* ``blocks = 0``: no Transformer; the conditioning is the mean of the tokens.

Where σ comes from is the binding ``sigma`` (:mod:`dfqkit.mixers.sigma_readouts`): ``"token"``
(default, the above), ``"relation"`` (plus a learned ``K × K`` class-relation bias) or
``"after_blocks"`` (read with the Eq. 8 output as the query).

Reference: "Enhancing Diversity for Data-free Quantization" (CVPR 2025), Eq. 4-8 and supplement.
Reconstruction choices (token reading of ``O^0``, σ averaged over heads and levels, per-sample
mixing with probability ``mix_prob`` as Qimera does) are documented in docs/methods/diversity.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dfqkit.mixers.base import Mixer
from dfqkit.mixers.flow_attention import FlowLevelAttention, LevelTransformer
from dfqkit.mixers.level_embeddings import LevelEmbeddings
from dfqkit.mixers.sigma_readouts import SIGMA_READOUTS, output_attention, relation_bias
from dfqkit.registry import register
from dfqkit.step import Step, SynthBatch


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"MultiLayerAttentionMixer.{name} must be an integer >= {low}, got {value!r}"
        )
    return value


@register("mixers")
class MultiLayerAttentionMixer(Mixer):
    """Attention over multi-level class embeddings; attention scores are the soft labels.

    Args:
        num_classes: ``K``; ``None`` takes the generator's when the trainer binds the mixer.
        levels: ``J`` parts of the teacher giving embedding levels (0: one learned table).
        dim: embedding / attention width ``D``.
        heads: attention heads of the mixer (0: random Qimera coefficients instead).
        classes_per_sample: ``c``, classes a mixed sample draws (capped at ``K``).
        mix_prob: probability that a sample is mixed (otherwise its target is one-hot).
        flow_steps: coupling layers of each level's flow (0: no flow attention).
        flow_heads: heads of the flow attention and of the Transformer blocks.
        blocks: ``B`` Transformer blocks (0: none).
        mlp_ratio: MLP width of the Transformer blocks as a multiple of ``D``.
        embed_epochs: epochs during which the level classifiers ``MLP^j`` train (the paper:
            warm-up / 5); frozen afterwards.
        embed_weight: weight of the classifiers' cross entropy in the generator step.
        sigma: where the soft-label coefficients σ come from, one of ``SIGMA_READOUTS``
            (``"relation"`` and ``"after_blocks"`` need ``heads >= 1``).
    """

    stage = "cond"

    def __init__(
        self,
        *,
        num_classes: int | None = None,
        levels: int = 3,
        dim: int = 64,
        heads: int = 4,
        classes_per_sample: int = 10,
        mix_prob: float = 0.4,
        flow_steps: int = 2,
        flow_heads: int = 4,
        blocks: int = 2,
        mlp_ratio: float = 2.0,
        embed_epochs: int = 4,
        embed_weight: float = 1.0,
        sigma: str = "token",
    ) -> None:
        super().__init__()
        if num_classes is not None:
            _check_int("num_classes", num_classes, 2)
        self.num_classes = num_classes
        self.levels = _check_int("levels", levels, 0)
        self.dim = _check_int("dim", dim, 2)
        self.heads = _check_int("heads", heads, 0)
        self._classes_per_sample = _check_int("classes_per_sample", classes_per_sample, 1)
        if not (isinstance(mix_prob, int | float) and 0.0 <= mix_prob <= 1.0):
            raise ValueError(
                f"MultiLayerAttentionMixer.mix_prob must be in [0, 1], got {mix_prob!r}"
            )
        self.mix_prob = float(mix_prob)
        self.flow_steps = _check_int("flow_steps", flow_steps, 0)
        self.blocks = _check_int("blocks", blocks, 0)
        self.embed_epochs = _check_int("embed_epochs", embed_epochs, 0)
        self.embed_weight = float(embed_weight)
        if sigma not in SIGMA_READOUTS:
            raise ValueError(
                f"MultiLayerAttentionMixer.sigma must be one of {SIGMA_READOUTS}, got {sigma!r}"
            )
        if sigma != "token" and not heads:
            raise ValueError(
                f"MultiLayerAttentionMixer.sigma={sigma!r} reads the mixer's attention, which "
                "heads = 0 removes (random coefficients); use sigma='token' or heads >= 1"
            )
        self.sigma = sigma
        self.relation: nn.Parameter | None = None
        for name, h in (("heads", heads), ("flow_heads", flow_heads)):
            if h and dim % h:
                raise ValueError(
                    f"MultiLayerAttentionMixer.dim={dim} must be divisible by {name}={h}"
                )
        num_levels = max(levels, 1)
        self.embeddings = None
        self.table = None
        if levels:
            self.needs = frozenset({"stages"})
            self.stage_parts = levels
        if num_classes is not None:
            self._build_class_parts(num_classes)
        self.token_norm = nn.LayerNorm(dim)
        if heads:
            self.o0 = nn.Parameter(torch.randn(dim) * 0.02)  # O^0, shared across samples
            scale = 1.0 / math.sqrt(dim)
            self.wq = nn.Parameter(torch.randn(num_levels, dim, dim) * scale)
            self.wk = nn.Parameter(torch.randn(num_levels, dim, dim) * scale)
            self.wv = nn.Parameter(torch.randn(num_levels, dim, dim) * scale)
            self.wo = nn.Parameter(torch.randn(num_levels, dim, dim) * scale)
            self.out_norm = nn.LayerNorm(dim)
        _check_int("flow_heads", flow_heads, 1 if (flow_steps or blocks) else 0)
        self.flow = (
            FlowLevelAttention(num_levels, dim, flow_heads, flow_steps) if flow_steps else None
        )
        self.transformer = LevelTransformer(dim, flow_heads, blocks, mlp_ratio) if blocks else None
        self.to_cond: nn.Module = nn.Identity()

    # ---- set-up
    def _build_class_parts(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classes_per_sample = min(self._classes_per_sample, num_classes)
        if self.levels:
            self.embeddings = LevelEmbeddings(self.levels, num_classes, self.dim)
        else:
            self.table = nn.Parameter(torch.randn(1, num_classes, self.dim))
        if self.sigma == "relation":
            # zero: starts as the token reading; draws nothing from the RNG
            self.relation = nn.Parameter(torch.zeros(num_classes, num_classes))

    def bind(self, *, teacher: nn.Module, generator: nn.Module, example: torch.Tensor) -> None:
        gen = getattr(generator, "module", generator)
        if self.num_classes is None:
            self._build_class_parts(gen.num_classes)
            for param in (self.table, self.relation):
                if param is not None:
                    param.data = param.data.to(example.device)
        if self.embeddings is not None:
            self.embeddings.bind(teacher, example)
            self.embeddings.to(example.device)
        latent = getattr(gen, "latent_dim", self.dim)
        if latent != self.dim and isinstance(self.to_cond, nn.Identity):
            self.to_cond = nn.Linear(self.dim, latent).to(example.device)

    def _table(self) -> torch.Tensor:
        """``(J, K, D)`` layer-normed level embeddings."""
        if self.embeddings is not None:
            table = self.embeddings.table().detach()  # trained only by the heads' CE
        else:
            table = self.table
        return self.token_norm(table)

    @property
    def learns_sigma(self) -> bool:
        """Whether σ is learned (attention) rather than drawn at random (``heads = 0``)."""
        return bool(self.heads)

    # ---- the mixing
    def _draw_classes(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b, c)`` distinct classes with the sample's label first, and the ``(b, c)`` mask of
        classes taking part (all for a mixed sample, only the first otherwise)."""
        b, c = labels.shape[0], self.classes_per_sample
        scores = torch.rand(b, self.num_classes, device=labels.device)
        scores.scatter_(1, labels[:, None], 2.0)  # the own label ranks first
        classes = scores.topk(c, dim=1).indices
        mixed = torch.rand(b, 1, device=labels.device) < self.mix_prob
        mask = torch.ones(b, c, dtype=torch.bool, device=labels.device)
        mask[:, 1:] = mixed
        return classes, mask

    def _attend(
        self, tokens: torch.Tensor, mask: torch.Tensor, classes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens (J, b, c, D)`` → mixed level tokens ``m (b, J, D)`` and ``σ (b, c)``."""
        j, b, c, d = tokens.shape
        h = self.heads
        if not h:
            noise = torch.randn(b, c, device=tokens.device).masked_fill(~mask, float("-inf"))
            sigma = noise.softmax(-1)
            m = torch.einsum("bc,jbcd->bjd", sigma, tokens)
            return m, sigma
        dh = d // h
        q = torch.einsum("d,jde->je", self.o0, self.wq).view(j, 1, h, dh)
        k = torch.einsum("jbcd,jde->jbce", tokens, self.wk).view(j, b, c, h, dh)
        v = torch.einsum("jbcd,jde->jbce", tokens, self.wv).view(j, b, c, h, dh)
        logits = torch.einsum("jxhe,jbche->jbhc", q, k) / math.sqrt(dh)
        if self.relation is not None:
            logits = logits + relation_bias(self.relation, classes, mask)[None, :, None, :]
        attn = logits.masked_fill(~mask[None, :, None, :], float("-inf")).softmax(-1)
        out = torch.einsum("jbhc,jbche->jbhe", attn, v).reshape(j, b, d)
        m = self.out_norm(self.o0 + torch.einsum("jbd,jde->jbe", out, self.wo))  # (J, b, D)
        sigma = attn.mean(dim=(0, 2))  # heads and levels averaged: (b, c)
        return m.transpose(0, 1), sigma

    def forward(self, batch: SynthBatch, generator: nn.Module) -> SynthBatch:
        labels = batch.labels
        b = labels.shape[0]
        classes, mask = self._draw_classes(labels)
        tokens = self._table()[:, classes]  # (J, b, c, D)
        m, sigma = self._attend(tokens, mask, classes)
        z = batch.z
        if z is None or z.shape[-1] != self.dim:
            z = torch.randn(b, self.dim, device=labels.device)
        if self.flow is not None:
            t, _ = self.flow(m, z)
        else:
            t = m + z[:, None, :]
        g = self.transformer(t) if self.transformer is not None else t.mean(1)
        if self.sigma == "after_blocks":
            sigma = output_attention(g, tokens, self.wq, self.wk, mask, self.heads)
        targets = torch.zeros(b, self.num_classes, device=labels.device, dtype=sigma.dtype)
        targets = targets.scatter_add(1, classes, sigma)  # Σ σ_i onehot(k_i), differentiable
        return batch.replace(
            labels=targets.detach().argmax(1),
            targets=targets,
            cond=self.to_cond(g),
            mix={"classes": classes, "sigma": sigma, "mixed": mask[:, 1:].any(1)},
        )

    def unmixed(self, batch: SynthBatch, generator: nn.Module) -> SynthBatch:
        """Every sample conditioned on its own class alone (σ = 1 on it): the same path as a
        sample the mixer leaves unmixed."""
        prob, self.mix_prob = self.mix_prob, 0.0
        try:
            return self(batch, generator)
        finally:
            self.mix_prob = prob

    # ---- the level classifiers' own loss
    def aux_loss(self, step: Step) -> torch.Tensor | None:
        if self.embeddings is None or step.epoch >= self.embed_epochs:
            return None
        features = step.teacher_taps["stages"][self.levels]
        return self.embed_weight * self.embeddings.loss(features, step.batch.targets)

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, dim={self.dim}, heads={self.heads}, "
            f"classes_per_sample={self.classes_per_sample}, mix_prob={self.mix_prob}, "
            f"flow_steps={self.flow_steps}, blocks={self.blocks}, "
            f"embed_epochs={self.embed_epochs}, sigma={self.sigma!r}"
        )
