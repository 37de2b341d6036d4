"""Batched, differentiable image augmentations of the synthesis methods (no loop over samples).

``random_resized_crop`` draws one crop box (and flip) per sample on a CPU generator and applies
all of them with one ``affine_grid`` + ``grid_sample`` call, so gradients reach the pixels of a
learnable image bank and the device never waits for the host. ``roll`` is the jitter of
DeepInversion-style synthesis (one shift for the batch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def crop_boxes(
    n: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(n, 2, 3)`` affine matrices (normalised coordinates) of random resized crops.

    A crop covers a share ``s ~ U(scale)`` of the image area with aspect ratio ``r`` drawn
    log-uniformly from ``ratio`` (width ``sqrt(s r)``, height ``sqrt(s / r)`` of the side, each
    capped at 1), at a uniformly random position inside the image; with ``flip`` it is mirrored
    left-right with probability ½. Drawn on the CPU.
    """
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    area = lo + (hi - lo) * torch.rand(n, generator=generator)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(
        n, generator=generator
    )
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(n, generator=generator) - 1)
    cy = (1 - h) * (2 * torch.rand(n, generator=generator) - 1)
    sx = w
    if flip:
        sx = torch.where(torch.rand(n, generator=generator) < 0.5, -w, w)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    return theta


def apply_crops(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample each image's crop box ``theta`` (``(b, 2, 3)``) to the full size (bilinear)."""
    theta = theta.to(device=images.device, dtype=images.dtype, non_blocking=True)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(
    images: torch.Tensor,
    *,
    scale: tuple[float, float],
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random resized crop (and flip) per sample, differentiable in ``images``."""
    theta = crop_boxes(images.shape[0], scale=scale, flip=flip, generator=generator)
    return apply_crops(images, theta)


def roll(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None):
    """Roll the batch by one random ``(dy, dx)`` in ``[-max_shift, max_shift]`` pixels."""
    if max_shift <= 0:
        return images
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))
