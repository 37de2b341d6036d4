"""Real training images as the image source: the upper-bound reference, not a DFQ method."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfqkit.generators.base import Generator
from dfqkit.registry import register
from dfqkit.step import SynthBatch


@register("generators")
class RealDataReference(Generator):
    """Samples batches of real labelled training images (with replacement across batches).

    Used by the ``realdata_*`` recipes to measure what the same student steps reach on real data;
    it reads the training split, which a data-free method never does. Not trainable: the trainer
    runs no generator step with it.

    Args:
        data: an :class:`~dfqkit.data.EvalData` whose ``train`` split is used.
        seed: seed of the sampling order (independent of the global RNG, so it is reproducible
            and identical across resumes only through its state in checkpoints: the sampler
            draws with its own generator, stored in ``state_dict``).
    """

    trainable = False

    def __init__(self, *, data, seed: int = 0) -> None:
        if data.train is None:
            raise ValueError(
                f"RealDataReference needs a train split; dataset {data.name!r} has none"
            )
        super().__init__(num_classes=data.num_classes, latent_dim=1)
        images, labels = zip(*(data.train[i] for i in range(len(data.train))), strict=True)
        self.register_buffer("images", torch.stack(images), persistent=False)
        self.register_buffer("labels", torch.as_tensor(labels), persistent=False)
        self.register_buffer("rng_state", torch.Generator().manual_seed(seed).get_state())

    def sample(self, batch_size: int, device: torch.device) -> SynthBatch:
        rng = torch.Generator().set_state(self.rng_state.cpu())
        idx = torch.randint(0, len(self.labels), (batch_size,), generator=rng)
        self.rng_state.copy_(rng.get_state())
        labels = self.labels[idx].to(device)
        return SynthBatch(
            labels=labels,
            targets=F.one_hot(labels, self.num_classes).float(),
            images=self.images[idx].to(device),
        )

    def embed(self, labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        raise TypeError("RealDataReference has no conditioning: it samples images directly")

    def decode(self, batch: SynthBatch) -> torch.Tensor:
        return batch.images
