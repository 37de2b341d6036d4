"""Evaluation without any data: a held-out set synthesized from the teacher itself.

When a run has no images at all (``dfqkit.quantize(model)`` without ``data=`` or
``images=``), epochs are compared on a fixed set of images distilled from the teacher before
training, never used for training, and labelled by the teacher: top-1 on it is **agreement with
the float model on the teacher's own distilled data**, a data-free criterion — reported as such,
not as accuracy.

How the set is made (a decision, docs/quantize_your_model.md "Without data"):

* a teacher with batch norm: ZeroQ's distillation (pixels optimised from uniform noise so that
  every BN layer's batch statistics match its running ones, plus ZeroQ's input prior), the
  method that needs nothing but the teacher and is cheapest per image; its images are fixed, so
  the criterion does not move with the method's generator as a held-out draw of that generator
  would;
* a teacher without batch norm (a ViT): Gaussian noise in the normalized input space, labelled
  by the teacher — a weak criterion, and the run says so in its log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from dfqkit.data.eval_data import EvalData, TensorImageDataset, data_factory
from dfqkit.data.teacher_labels import label_with_teacher
from dfqkit.generators.synthetic_set import SyntheticSet
from dfqkit.losses.synthesis import ZeroQBNSLoss
from dfqkit.taps import bn_layers

logger = logging.getLogger(__name__)


@data_factory
def distilled_holdout(
    *,
    num_classes: int,
    image_size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_images: int = 256,
    iterations: int = 200,
    batch_size: int = 64,
    seed: int = 1234,
) -> EvalData:
    """A data-free evaluation set, made from the teacher when the run is built (see the module
    docstring): half of it selects the epoch (val), half is reported (test).

    Args:
        num_classes, image_size, channels, mean, std: the teacher's input and classes.
        num_images: images in the set (a multiple of ``batch_size``; at least 2 batches).
        iterations: optimisation steps per batch (ZeroQ uses 500).
        batch_size: images distilled together.
        seed: the set's seed, apart from the run's (the set stays the same across seeds).
    """
    if num_images % batch_size or num_images < 2 * batch_size:
        raise ValueError(
            f"distilled_holdout.num_images={num_images} must be a multiple of "
            f"batch_size={batch_size}, at least two batches"
        )
    placeholder = TensorImageDataset(
        torch.zeros(1, channels, image_size, image_size), torch.zeros(1, dtype=torch.long)
    )
    shape = EvalData(
        name="distilled_holdout",
        num_classes=num_classes,
        image_size=image_size,
        channels=channels,
        mean=tuple(mean),
        std=tuple(std),
        val=placeholder,
        test=placeholder,
        labelled_by="teacher",
    )

    def prepare(teacher: nn.Module, device: torch.device) -> EvalData:
        images = _distil(shape, teacher, device, num_images, iterations, batch_size, seed)
        half = num_images // 2
        zeros = torch.zeros(num_images, dtype=torch.long)
        made = EvalData(
            name=f"distilled_holdout ({num_images} images distilled from the teacher)",
            num_classes=num_classes,
            image_size=image_size,
            channels=channels,
            mean=tuple(mean),
            std=tuple(std),
            val=TensorImageDataset(images[:half], zeros[:half]),
            test=TensorImageDataset(images[half:], zeros[half:]),
        )
        return label_with_teacher(made, teacher, device)

    shape.prepare = prepare
    return shape


def _distil(shape, teacher, device, num_images, iterations, batch_size, seed) -> torch.Tensor:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if not bn_layers(teacher):
            logger.warning(
                "data-free evaluation: the teacher has no batch norm to distil images from; "
                "epochs are compared on %d Gaussian-noise images labelled by the teacher (a "
                "weak criterion: pass images= or data= to dfqkit.quantize for a better one)",
                num_images,
            )
            return torch.randn(num_images, shape.channels, shape.image_size, shape.image_size)
        bank = SyntheticSet(
            data=shape,
            losses=[ZeroQBNSLoss(input_prior=True)],
            num_images=num_images,
            synth_batch_size=batch_size,
            iterations=iterations,
            lr=0.5,
            plateau_patience=100,
            init="uniform",
            seed=seed,
        ).to(device)
        example = torch.zeros(2, shape.channels, shape.image_size, shape.image_size, device=device)
        bank.bind(teacher=teacher, generator=bank, example=example)
        return bank.images.detach().float().cpu()
