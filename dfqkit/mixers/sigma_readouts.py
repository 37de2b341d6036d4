"""Where the soft-label coefficients σ of the multi-layer attention mixer come from.

The paper trains σ as attention scores and says a learned ``O^0`` "captures relations among
classes", but not how; :class:`~dfqkit.mixers.attention_mixer.MultiLayerAttentionMixer` reads σ
in one of ``SIGMA_READOUTS`` (the binding ``sigma``):

* ``"token"`` (default): the attention of the shared learned token ``O^0`` over the class
  tokens. The logit of class ``k_i`` depends on its embedding alone, so σ is a learned score per
  class normalised over the classes drawn: with one head and one level
  ``σ_a / σ_b = exp(l_a - l_b)`` whatever the other classes are, and σ does not depend on the
  sample's noise.
* ``"relation"``: the same logits plus a learned ``K × K`` class-relation bias
  (:func:`relation_bias`), the other reading of ``O^0`` (a class-relation matrix added to the
  attention); zero-initialised, so it starts as the token readout.
* ``"after_blocks"``: the attention of the Eq. 8 output ``g`` (the pooled Transformer tokens,
  which depend on every class mixed and, through the flow, on the sample's noise) over the class
  tokens, with the mixer's own projections (:func:`output_attention`). The level tokens are
  still mixed by ``O^0``'s attention; only the soft label is read later.

Reference: "Enhancing Diversity for Data-free Quantization" (CVPR 2025), supplement (σ as
attention scores, ``O^0``). All three are dfqkit's GUESS (docs/methods/diversity.md).
"""

from __future__ import annotations

import math

import torch

SIGMA_READOUTS = ("token", "relation", "after_blocks")


def relation_bias(
    relation: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``(b, c)`` logit bias: the mean of ``R[k_i, k_l]`` over the classes ``l ≠ i`` taking part.

    Args:
        relation: ``(K, K)`` learned ``R``; row ``a`` says how much class ``a`` gains next to
            each partner.
        classes: ``(b, c)`` classes drawn.
        mask: ``(b, c)`` classes taking part (a sample without partners gets 0).
    """
    c = classes.shape[1]
    pair = relation[classes[:, :, None], classes[:, None, :]]  # (b, c, c)
    eye = torch.eye(c, dtype=torch.bool, device=classes.device)
    partners = mask[:, None, :] & ~eye  # (b, c, c): l takes part and l ≠ i
    return (pair * partners).sum(-1) / partners.sum(-1).clamp_min(1)


def output_attention(
    g: torch.Tensor,
    tokens: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    mask: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """σ ``(b, c)``: the attention of a per-sample query over the class tokens, heads and levels
    averaged.

    Args:
        g: ``(b, D)`` the query (the Eq. 8 output).
        tokens: ``(J, b, c, D)`` class tokens.
        wq, wk: ``(J, D, D)`` per-level query and key projections.
        mask: ``(b, c)`` classes taking part.
        heads: ``H`` (divides ``D``).
    """
    j, b, c, d = tokens.shape
    dh = d // heads
    q = torch.einsum("bd,jde->jbe", g, wq).view(j, b, heads, dh)
    k = torch.einsum("jbcd,jde->jbce", tokens, wk).view(j, b, c, heads, dh)
    logits = torch.einsum("jbhe,jbche->jbhc", q, k) / math.sqrt(dh)
    attn = logits.masked_fill(~mask[None, :, None, :], float("-inf")).softmax(-1)
    return attn.mean(dim=(0, 2))
