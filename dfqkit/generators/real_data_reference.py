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
        seed: seed of the sampling order. The sampler draws indices on the CPU with its own
            generator (no host sync per batch), whose state travels in ``state_dict`` (extra
            state), so a resumed run continues the same sequence.
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
        self._rng = torch.Generator().manual_seed(seed)

    def get_extra_state(self) -> dict:
        return {"rng_state": self._rng.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self._rng.set_state(state["rng_state"])

    def sample(self, batch_size: int, device: torch.device) -> SynthBatch:
        idx = torch.randint(0, len(self.labels), (batch_size,), generator=self._rng)
        idx = idx.to(self.labels.device, non_blocking=True)
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
