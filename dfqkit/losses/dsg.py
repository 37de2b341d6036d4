"""DSG's QAT generator losses: slack BN statistics with layer-wise enhancement, and the
eigen-structure ("SCI") diversity loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dfqkit.losses.base import Loss
from dfqkit.losses.bn_stats import channel_mean_var
from dfqkit.registry import register
from dfqkit.step import Step

MARGIN_MODES = ("distance", "hinge")


@register("losses")
class DSGSlackBNSLoss(Loss):
    """DSG's slack batch-norm statistics loss (QAT variant).

    For BN layer ``l`` with batch statistics ``μ̂, σ̂²`` over ``(b, h, w)`` (biased variance, as
    GDFQ) and margins ``m_l, n_l``, per channel

        g_μ = | |μ̂ − μ| − m_l |   (``margin_mode="distance"``, the released code)
        g_μ = relu(|μ̂ − μ| − m_l) (``"hinge"``, the paper's slack)

    and likewise ``g_σ²`` with ``n_l``; entry ``l`` of both gap vectors (channel index = layer
    index, where the layer has that many channels) is multiplied by ``√2`` — the code's
    "layer-wise sample enhancement"; the loss is ``(1/L) Σ_l (‖g_μ‖² + ‖g_σ²‖²)``.

    The margins come from ``m.npy``/``n.npy`` files that were never released; dfqkit computes
    them as ``slack`` standard errors of a batch statistic of a Gaussian with the layer's
    running variance over ``P = b·h·w`` positions: ``m = slack·σ/√P``,
    ``n = slack·σ²·√(2/(P − 1))`` (the same rule as the PTQ variant's
    :class:`~dfqkit.losses.ZeroQBNSLoss`, for the variance instead of the std).

    Reference: Zhang et al., "Diversifying Sample Generation for Accurate Data-Free
    Quantization", CVPR 2021, ``quantization_aware_training/trainer.py`` of the official code.

    Args:
        slack: margin in standard errors (0: no margin).
        margin_mode: ``"distance"`` (the released code's ``|(|Δ| − m)|``, which also penalises
            deviations *below* the margin) or ``"hinge"`` (a deviation within the margin is
            free).
        enhancement: factor on the gap entry ``l`` of layer ``l`` (``√2`` in the code; 1: off).
    """

    needs = frozenset({"bn_inputs"})
    requires_bn = True

    def __init__(
        self,
        *,
        slack: float = 1.645,
        margin_mode: str = "distance",
        enhancement: float = math.sqrt(2.0),
        weight: float = 1.0,
        side: str | None = None,
    ) -> None:
        super().__init__(weight=weight, side=side)
        if isinstance(slack, bool) or not isinstance(slack, int | float) or slack < 0:
            raise ValueError(f"DSGSlackBNSLoss.slack must be a number >= 0, got {slack!r}")
        if margin_mode not in MARGIN_MODES:
            raise ValueError(
                f"DSGSlackBNSLoss.margin_mode must be one of {MARGIN_MODES}, got {margin_mode!r}"
            )
        if isinstance(enhancement, bool) or not isinstance(enhancement, int | float):
            raise ValueError(f"DSGSlackBNSLoss.enhancement must be a number, got {enhancement!r}")
        self.slack, self.margin_mode, self.enhancement = (
            float(slack),
            margin_mode,
            float(enhancement),
        )

    def _gap(self, delta: torch.Tensor, margin: torch.Tensor, layer: int) -> torch.Tensor:
        gap = delta.abs() - margin
        sq = (gap.abs() if self.margin_mode == "distance" else F.relu(gap)).pow(2)
        total = sq.sum()
        if self.enhancement != 1.0 and layer < sq.shape[0]:  # entry `layer` counts enhancement²
            total = total + (self.enhancement**2 - 1.0) * sq[layer]
        return total

    def compute(self, step: Step) -> torch.Tensor:
        pairs = step.teacher_taps["bn_inputs"]
        total = 0.0
        for layer, (x, bn) in enumerate(pairs):
            mean, var = channel_mean_var(x.float())
            positions = x.numel() // x.shape[1]
            sigma2 = bn.running_var
            m = self.slack * sigma2.sqrt() / math.sqrt(positions)
            n = self.slack * sigma2 * math.sqrt(2.0 / max(positions - 1, 1))
            total = total + self._gap(mean - bn.running_mean, m, layer)
            total = total + self._gap(var - sigma2, n, layer)
        return total / len(pairs)

    def extra_repr(self) -> str:
        mode = f"margin_mode={self.margin_mode!r}"
        return f"slack={self.slack}, {mode}, enhancement={self.enhancement:.4g}"


def gram_spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the Gram matrix of the
    L2-normalised, flattened samples of ``x`` (``(b, ...)`` -> ``(b,)``, ``(b, b)``)."""
    phi = F.normalize(x.flatten(1).float(), p=2, dim=1)
    vals, vecs = torch.linalg.eigh(phi @ phi.t())
    # an eigenvector's sign is arbitrary (LAPACK's choice); fix it so that each column's
    # largest-magnitude entry is positive, which makes the structure term well defined
    peak = vecs.detach().abs().argmax(dim=0, keepdim=True)
    sign = torch.sign(vecs.detach().gather(0, peak))
    return vals, vecs * torch.where(sign == 0, torch.ones_like(sign), sign)


@register("losses")
class EigenStructureLoss(Loss):
    """DSG's sample-diversity ("SCI") loss: the synthesized batch's Gram spectrum against that
    of Gaussian noise of the same shape.

    With ``(λ, V)`` the eigen-decomposition of the Gram matrix of the batch's normalised
    samples and ``(λ', V')`` that of a fresh N(0, 1) batch (eigenvalues ascending, eigenvectors
    as columns),

        L = magnitude · MSE(λ, λ') + | Σ_i w_i · (−⟨V_i, V'_i⟩) |,  w = minmax-normalised λ'

    divided by the number of BN layers (``per_bn_layer``, as the code divides it in the
    generator loss). The released code calls ``torch.eig`` (removed from PyTorch) on this
    symmetric matrix; ``torch.linalg.eigh`` gives the same decomposition with eigenvalues
    sorted, so the i-th eigenvectors of both batches are paired by rank (``torch.eig``'s order
    was LAPACK's, unspecified). Gradients flow through the eigenvalues and eigenvectors of the
    synthesized batch. An eigenvector's sign is arbitrary (the original leaves it to LAPACK);
    dfqkit fixes each so its largest-magnitude entry is positive, so the loss is a function of
    the batch.

    Reference: Zhang et al., CVPR 2021 (DSG), ``compute_sci`` in the official QAT trainer.

    Args:
        magnitude: factor of the eigenvalue term (1e-4 in the code).
        per_bn_layer: divide by the number of the teacher's BN layers.
    """

    needs = frozenset({"bn_inputs"})

    def __init__(
        self,
        *,
        magnitude: float = 1e-4,
        per_bn_layer: bool = True,
        weight: float = 1.0,
        side: str | None = None,
    ) -> None:
        super().__init__(weight=weight, side=side)
        if isinstance(magnitude, bool) or not isinstance(magnitude, int | float) or magnitude < 0:
            raise ValueError(f"EigenStructureLoss.magnitude must be >= 0, got {magnitude!r}")
        self.magnitude, self.per_bn_layer = float(magnitude), bool(per_bn_layer)
        if not self.per_bn_layer:  # the BN inputs are read only to count the layers
            self.needs = frozenset()

    def compute(self, step: Step) -> torch.Tensor:
        images = step.batch.images
        vals, vecs = gram_spectrum(images)
        with torch.no_grad():
            ref_vals, ref_vecs = gram_spectrum(torch.randn_like(images, dtype=torch.float32))
            w = (ref_vals - ref_vals.min()) / (ref_vals.max() - ref_vals.min()).clamp_min(1e-12)
        magnitude = self.magnitude * F.mse_loss(vals, ref_vals)
        structure = -(vecs * ref_vecs).sum(0)
        loss = magnitude + (w * structure).sum().abs()
        if self.per_bn_layer:
            loss = loss / max(len(step.teacher_taps.get("bn_inputs", ())), 1)
        return loss

    def extra_repr(self) -> str:
        return f"magnitude={self.magnitude}, per_bn_layer={self.per_bn_layer}"
