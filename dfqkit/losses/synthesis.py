"""Losses of synthesis by optimisation (learnable pixels against the teacher): ZeroQ's
per-sample statistics loss with its input prior, IntraQ's target-probability loss, HAST's
focal cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfqkit.losses.base import Loss
from dfqkit.registry import register
from dfqkit.step import Step


def _per_sample_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b, c, ...) -> (mean (b, c), std (b, c))`` over the spatial positions of each sample;
    the std is ``sqrt(unbiased var + eps)``."""
    flat = x.flatten(2)
    var, mean = torch.var_mean(flat, dim=2, correction=1)
    return mean, (var + eps).sqrt()


def _sq_dist_per_sample(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``‖target − value‖² / b`` with ``target (c,)`` broadcast over ``value (b, c)``."""
    return (value - target).pow(2).sum() / value.shape[0]


@register("losses")
class ZeroQBNSLoss(Loss):
    """ZeroQ's statistics loss: for every BatchNorm layer, the per-sample channel mean and
    standard deviation of its input (over the spatial positions) against the running mean and
    ``sqrt(running_var + eps)``, as ``‖μ − μ̂_i‖² / b`` summed over samples, channels and
    layers (not averaged); with ``input_prior`` the same two terms for the image itself
    against mean 0 and std 1 per channel. The standard deviation, not the variance, is
    matched, and the statistics are per sample, unlike GDFQ's batch statistics
    (:class:`~dfqkit.losses.BNStatsLoss`). BN inputs without spatial positions are skipped.

    DSG's PTQ variant adds two options. ``slack``: a deviation within a margin costs nothing,
    ``relu(|μ̂ − μ| − m)²`` and ``relu(|σ̂ − σ| − n)²``, with margins computed here rather than
    loaded (DSG's margin files were never released): the ``slack``-sigma deviation a sample's
    statistic would show if its ``P`` positions were independent draws from the layer's running
    distribution, ``m = slack·σ/√P`` and ``n = slack·σ/√(2(P − 1))``. ``layer_emphasis``:
    sample ``i`` weighs layer ``i mod L`` by this factor (DSG: 2), so different samples match
    different layers most closely.

    Genie-D's form is ``statistics="batch"``: one mean and std per channel over the whole batch
    and its positions, each term ``‖μ − μ̂‖² / C`` (mean over channels).

    Reference: Cai et al., "ZeroQ", CVPR 2020; Zhang et al., "DSG", CVPR 2021; Jeon et al.,
    "Genie", CVPR 2023 (each as its official code computes it; docs/methods.md).

    Args:
        input_prior: add the input image's statistics terms.
        eps: added to the variances before the square root (ZeroQ: 1e-6).
        slack: margin in standard errors (``None``: ZeroQ, no margin).
        layer_emphasis: weight of sample ``i``'s terms on layer ``i mod L`` (1: off).
        statistics: ``"per_sample"`` (ZeroQ, DSG) or ``"batch"`` (Genie-D).
    """

    needs = frozenset({"bn_inputs"})
    requires_bn = True

    def __init__(
        self,
        *,
        input_prior: bool = True,
        eps: float = 1e-6,
        slack: float | None = None,
        layer_emphasis: float = 1.0,
        statistics: str = "per_sample",
        **kw,
    ) -> None:
        super().__init__(**kw)
        if statistics not in ("per_sample", "batch"):
            raise ValueError(
                f"ZeroQBNSLoss.statistics must be 'per_sample' or 'batch', got {statistics!r}"
            )
        if statistics == "batch" and (slack or layer_emphasis != 1.0):
            raise ValueError("ZeroQBNSLoss: slack and layer_emphasis need per-sample statistics")
        self.statistics = statistics
        if slack is not None and (not isinstance(slack, int | float) or slack < 0):
            raise ValueError(f"ZeroQBNSLoss.slack must be None or a number >= 0, got {slack!r}")
        if not isinstance(layer_emphasis, int | float) or layer_emphasis <= 0:
            raise ValueError(
                f"ZeroQBNSLoss.layer_emphasis must be a number > 0, got {layer_emphasis!r}"
            )
        self.input_prior, self.eps = bool(input_prior), float(eps)
        self.slack = None if slack is None else float(slack)
        self.layer_emphasis = float(layer_emphasis)

    def _term(self, mean, std, mu, sigma, positions: int, weights) -> torch.Tensor:
        dm, ds = (mean - mu).abs(), (std - sigma).abs()
        if self.slack:
            dm = F.relu(dm - self.slack * sigma / positions**0.5)
            ds = F.relu(ds - self.slack * sigma / (2 * max(positions - 1, 1)) ** 0.5)
        per_sample = dm.pow(2).sum(1) + ds.pow(2).sum(1)  # (b,)
        if weights is not None:
            per_sample = per_sample * weights
        return per_sample.sum() / mean.shape[0]

    def _batch(self, step: Step, pairs) -> torch.Tensor:
        def term(x, mu, sigma):
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
            std = (var + self.eps).sqrt()
            return (mean - mu).pow(2).mean() + (std - sigma).pow(2).mean()

        total = sum(term(x, bn.running_mean, (bn.running_var + self.eps).sqrt()) for x, bn in pairs)
        if self.input_prior:
            c = step.batch.images.shape[1]
            ones = step.batch.images.new_ones(c)
            total = total + term(step.batch.images, torch.zeros_like(ones), ones)
        return total

    def compute(self, step: Step) -> torch.Tensor:
        pairs = [(x, bn) for x, bn in step.teacher_taps["bn_inputs"] if x.dim() >= 3]
        if not pairs:
            raise ValueError("ZeroQBNSLoss found no BatchNorm input with spatial positions")
        if self.statistics == "batch":
            return self._batch(step, pairs)
        b = pairs[0][0].shape[0]
        total = 0.0
        for layer, (x, bn) in enumerate(pairs):
            weights = None
            if self.layer_emphasis != 1.0:
                owner = torch.arange(b, device=x.device) % len(pairs) == layer
                weights = 1.0 + (self.layer_emphasis - 1.0) * owner.float()
            mean, std = _per_sample_stats(x.float(), self.eps)
            sigma = (bn.running_var + self.eps).sqrt()
            total = total + self._term(mean, std, bn.running_mean, sigma, x[0, 0].numel(), weights)
        if self.input_prior:
            x = step.batch.images.float()
            mean, std = _per_sample_stats(x, self.eps)
            total = total + _sq_dist_per_sample(torch.zeros_like(mean[0]), mean)
            total = total + _sq_dist_per_sample(torch.ones_like(std[0]), std)
        return total

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, input_prior={self.input_prior}, eps={self.eps}, "
            f"slack={self.slack}, layer_emphasis={self.layer_emphasis}, "
            f"statistics={self.statistics!r}"
        )


@register("losses")
class ImagePrior(Loss):
    """DeepInversion's image priors (used by DSG's PTQ): ``tv_l2 · Σ_d ‖Δ_d x‖`` over the four
    neighbour differences (horizontal, vertical, two diagonals; L2 norms over the batch) plus
    ``l2 · mean_i ‖x_i‖``.

    Reference: Yin et al., "DeepInversion", CVPR 2020; DSG (its official code: 0.01 and 0.01).

    Args:
        tv_l2, l2: the two coefficients.
    """

    def __init__(self, *, tv_l2: float = 0.01, l2: float = 0.01, **kw) -> None:
        super().__init__(**kw)
        self.tv_l2, self.l2 = float(tv_l2), float(l2)

    def compute(self, step: Step) -> torch.Tensor:
        x = step.batch.images.float()
        diffs = (
            x[:, :, :, :-1] - x[:, :, :, 1:],
            x[:, :, :-1, :] - x[:, :, 1:, :],
            x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
            x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
        )
        tv = sum(d.norm() for d in diffs)
        return self.tv_l2 * tv + self.l2 * x.flatten(1).norm(dim=1).mean()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tv_l2={self.tv_l2}, l2={self.l2}"


@register("losses")
class TargetProbabilityLoss(Loss):
    """IntraQ's class term: ``mean_i (softmax(F(x_i))_{y_i} − t_i)²``, pulling each image's
    teacher probability of its label to a target ``t_i`` rather than to 1, so images of one
    class differ in how typical they are. ``t_i`` comes with the batch
    (``batch.mix["target_prob"]``, drawn by :class:`~dfqkit.generators.SyntheticSet` once per
    synthesized batch: ``U[low, 1]`` for a random half of the samples, 1 for the rest); without
    it every target is 1.

    Reference: Zhong et al., "IntraQ", CVPR 2022, and its official code.
    """

    def compute(self, step: Step) -> torch.Tensor:
        prob = step.teacher_logits.float().softmax(dim=1)
        p_y = prob.gather(1, step.batch.labels[:, None]).squeeze(1)
        target = step.batch.mix.get("target_prob")
        target = torch.ones_like(p_y) if target is None else target.to(p_y)
        return (p_y - target).pow(2).mean()


@register("losses")
class FocalCE(Loss):
    """HAST's hard-sample term: ``mean_i (1 − p_{y_i})^γ · CE(F(x_i), y_i)``, weighting images
    the teacher finds hard (low ``p_y``) more; ``p_y`` is detached in the weight.

    Reference: Li et al., "HAST", CVPR 2023 (official code: β = weight 10, γ 2 CIFAR;
    β 0.1, γ 0.5 ImageNet).

    Args:
        gamma: focusing exponent.
    """

    def __init__(self, *, gamma: float = 2.0, **kw) -> None:
        super().__init__(**kw)
        if not isinstance(gamma, int | float) or gamma < 0:
            raise ValueError(f"FocalCE.gamma must be a number >= 0, got {gamma!r}")
        self.gamma = float(gamma)

    def compute(self, step: Step) -> torch.Tensor:
        logits = step.teacher_logits.float()
        ce = F.cross_entropy(logits, step.batch.labels, reduction="none")
        p_y = torch.exp(-ce.detach())
        return ((1 - p_y).pow(self.gamma) * ce).mean()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"


@register("losses")
class IntraClassMarginLoss(Loss):
    """IntraQ's intra-class heterogeneity term: the teacher's penultimate feature ``f_i`` of each
    image should lie at a cosine distance ``d_i = 1 − cos(f_i, c_{y_i})`` between ``low`` and
    ``high`` from its class centroid ``c_y``: ``mean_i [relu(low − d_i) + relu(d_i − high)]``
    over the samples whose class has a centroid (zero before any has).

    The centroids are the mean penultimate features of the images finished in earlier groups
    (:class:`~dfqkit.generators.SyntheticSet` calls :meth:`observe` after each group of
    ``group_batches`` batches), so a new group is pushed neither onto nor too far from what
    earlier groups made. The penultimate feature is the pooled output of the teacher's last
    block (the ``stages`` tap with one part).

    Reference: Zhong et al., "IntraQ", CVPR 2022 (official code: C10 0.05 / 0.8, C100
    0.02 / 1.0, ImageNet off).

    Args:
        low, high: the cosine-distance band.
    """

    needs = frozenset({"stages"})
    stage_parts = 1

    def __init__(self, *, low: float = 0.05, high: float = 0.8, **kw) -> None:
        super().__init__(**kw)
        if not (
            isinstance(low, int | float) and isinstance(high, int | float) and 0 <= low <= high
        ):
            raise ValueError(
                f"IntraClassMarginLoss needs 0 <= low <= high, got low={low!r}, high={high!r}"
            )
        self.low, self.high = float(low), float(high)
        self.register_buffer("sums", torch.empty(0), persistent=False)
        self.register_buffer("counts", torch.empty(0), persistent=False)

    @staticmethod
    def features(step: Step) -> torch.Tensor:
        return step.teacher_taps["stages"][1][-1]

    def reset(self) -> None:
        self.sums, self.counts = torch.empty(0), torch.empty(0)

    @torch.no_grad()
    def observe(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        """Add finished images' penultimate features to their classes' centroids."""
        features = features.float()
        if self.sums.numel() == 0:
            self.sums = features.new_zeros(num_classes, features.shape[1])
            self.counts = features.new_zeros(num_classes)
        self.sums.index_add_(0, labels, features)
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=features.dtype))

    def compute(self, step: Step) -> torch.Tensor:
        f = self.features(step).float()
        if self.sums.numel() == 0:
            return f.sum() * 0.0
        labels = step.batch.labels
        count = self.counts[labels]
        centroid = self.sums[labels] / count.clamp(min=1)[:, None]
        d = 1 - F.cosine_similarity(f, centroid, dim=1)
        per = F.relu(self.low - d) + F.relu(d - self.high)
        valid = (count > 0).to(per.dtype)
        return (per * valid).sum() / valid.sum().clamp(min=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, low={self.low}, high={self.high}"


@register("losses")
class FeatureAttentionLoss(Loss):
    """HAST's feature-attention alignment (a student loss): for every block ``l``,
    ``mean((a_S,l − a_T,l)²)`` summed over blocks, with ``a = normalize(mean over positions of
    out²)`` the L2-normalised channel attention of the block's output (the ``block_attention``
    tap on both models).

    Reference: Li et al., "HAST", CVPR 2023 (official code: λ = weight 1000 CIFAR, 4000
    ImageNet; the official code taps each residual block's body, dfqkit the block's output).
    """

    default_side = "student"
    needs = frozenset({"block_attention"})
    needs_student_taps = frozenset({"block_attention"})

    def compute(self, step: Step) -> torch.Tensor:
        teacher = step.teacher_taps["block_attention"]
        student = step.student_taps["block_attention"]
        if len(teacher) != len(student):
            raise ValueError(
                f"FeatureAttentionLoss: the teacher has {len(teacher)} blocks, the student "
                f"{len(student)}"
            )
        return sum((s - t).pow(2).mean() for s, t in zip(student, teacher, strict=True))
