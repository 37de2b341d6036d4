"""A fixed synthetic set made by optimising pixels against the teacher (ZeroQ, DSG, IntraQ, HAST):
stage one of a two-stage run, cached on disk; stage two (calibration or fine-tuning) samples it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dfqkit.generators.augment import apply_crops, crop_boxes, random_resized_crop, roll
from dfqkit.generators.base import Generator
from dfqkit.losses.base import Loss
from dfqkit.registry import register
from dfqkit.step import Step, SynthBatch
from dfqkit.taps import Taps

logger = logging.getLogger(__name__)

INITS = ("gaussian", "uniform")
PARAMETRIZATIONS = ("pixels", "generator")


class GenieDecoder(nn.Module):
    """Genie-D's small per-batch generator: ``Linear(latent → 128·(s/4)²)`` → BN(128) → ×2 →
    Conv3×3(128→64) → BN → LeakyReLU(0.2) → ×2 → Conv3×3(64→c) → Tanh → BN(c, affine=False).
    Unconditional; a fresh one is made for every batch (Genie's official code; docs/methods.md)."""

    def __init__(self, latent_dim: int, image_size: int, channels: int) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"GenieDecoder needs an image size divisible by 4, got {image_size}")
        self.init = image_size // 4
        self.fc = nn.Linear(latent_dim, 128 * self.init**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(128),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(128, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(64, channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.fc(z).view(z.shape[0], 128, self.init, self.init))


class _Swing:
    """Genie's swing convolution, as forward pre-hooks on the teacher's strided convolutions:
    the input is reflect-padded by one pixel and cropped back at a random offset (a shift of
    at most one pixel), drawn on a CPU generator."""

    def __init__(self, teacher: nn.Module, generator: torch.Generator) -> None:
        self.gen = generator
        self.handles = [
            m.register_forward_pre_hook(self._hook)
            for m in teacher.modules()
            if isinstance(m, nn.Conv2d) and max(m.stride) > 1
        ]

    def _hook(self, _module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        h, w = x.shape[-2:]
        dy, dx = torch.randint(0, 3, (2,), generator=self.gen).tolist()
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return (padded[..., dy : dy + h, dx : dx + w], *args[1:])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


LABELS = ("random", "balanced")


def cache_root() -> Path:
    """``$DFQKIT_CACHE/synthetic`` if ``DFQKIT_CACHE`` is set, else
    ``~/.cache/dfqkit/synthetic``."""
    root = os.environ.get("DFQKIT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "dfqkit") / "synthetic"


def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"SyntheticSet.{name} must be an integer >= {low}, got {value!r}")
    return value


def _scale(name: str, value) -> tuple[float, float] | None:
    if value is None:
        return None
    ok = (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) for v in value)
        and 0 < value[0] <= value[1] <= 1
    )
    if not ok:
        raise ValueError(
            f"SyntheticSet.{name} must be None or (low, high) with 0 < low <= high <= 1, "
            f"got {value!r}"
        )
    return float(value[0]), float(value[1])


@register("generators")
class SyntheticSet(Generator):
    """``num_images`` images optimised batch by batch against the teacher, then kept fixed.

    **Stage one** (when the trainer binds the generator to the teacher, before any training
    step): each batch of ``synth_batch_size`` images starts from noise (``init``) with labels
    (``labels``) and is optimised for ``iterations`` steps of Adam(``lr``, ``betas``) under
    ``ReduceLROnPlateau(factor, patience, min_lr)`` against ``losses`` (generator-side losses
    reading the teacher, e.g. :class:`~dfqkit.losses.ZeroQBNSLoss`). With probability
    ``synth_augment_prob`` an iteration sees the batch through a random resized crop
    (``synth_crop_scale``) and flip; every iteration rolls it by up to ``jitter`` pixels.
    Finished batches are written to ``cache_dir/<key>/batch_NNNN.safetensors`` (atomically),
    where the key hashes the teacher's weights and every setting here; a later run with the
    same key (any recipe, any student) reads them instead of synthesizing, and a run killed in
    stage one keeps its finished batches. Several processes split the batches between them.

    **Stage two**: ``sample`` serves batches from the set, walking through a fresh permutation
    each pass (so one pass calibrates on every image once), optionally through a random
    resized crop (``crop_scale``) and flip per sample. The set is not trainable: the trainer
    runs no generator step.

    The plateau scheduler reads the loss on the host; to keep the device from waiting every
    iteration the losses are collected on the device and handed to the scheduler every
    ``plateau_sync_every`` iterations, in order (same bookkeeping; a learning-rate drop takes
    effect up to ``plateau_sync_every - 1`` iterations late).

    Args:
        data: the :class:`~dfqkit.data.EvalData` whose shape, classes and normalization the
            images follow (its images are never read).
        losses: the synthesis losses (their ``side`` is ignored; their taps are installed on
            the teacher for stage one only).
        num_images: size of the set (a multiple of ``synth_batch_size``).
        synth_batch_size: images optimised together.
        iterations: optimisation steps per batch.
        lr, betas: Adam on the pixels.
        plateau_factor, plateau_patience, min_lr: ``ReduceLROnPlateau`` on the batch's loss.
        init: ``"gaussian"`` (N(0, 1)) or ``"uniform"`` (ZeroQ: U(−128, 127)/√5418.75, unit
            variance).
        labels: ``"random"`` (uniform) or ``"balanced"`` (class ``i mod C``).
        target_prob_low: with a value, half of the samples of each batch (at random) get a
            target probability ``t ~ U[target_prob_low, 1]`` in ``batch.mix["target_prob"]``
            (IntraQ), the others 1.
        synth_augment_prob, synth_crop_scale: stage-one augmentation.
        jitter: stage-one roll, pixels.
        crop_scale: stage-two random resized crop scale (``None``: images as stored).
        flip: flips with the crops (both stages).
        cache_dir: where sets are kept (default ``$DFQKIT_CACHE/synthetic`` or
            ``~/.cache/dfqkit/synthetic``).
        group_batches: batches per group for losses that look back at earlier groups (IntraQ's
            :class:`~dfqkit.losses.IntraClassMarginLoss`, official 5 batches of 256): before a
            group is optimised they observe every image of the groups before it. Such losses
            make the synthesis sequential (one process makes every batch).
        parametrization: ``"pixels"`` (the images are the parameters; ZeroQ, DSG, IntraQ,
            HAST) or ``"generator"`` (Genie-D: a fresh :class:`GenieDecoder` per batch and a
            learnable latent ``z`` of ``genie_latent_dim``; ``z`` uses ``lr``/``betas`` and the
            plateau schedule, the decoder Adam(``genie_lr``) decayed by ``genie_gamma`` every
            ``genie_step_every`` iterations).
        swing: Genie's swing convolution on the teacher's strided convolutions during stage one.
        seed: seed of the initial pixels, labels and augmentations of stage one (batch ``k``
            uses ``seed + k``) and of the sampling order of stage two.
    """

    accepts_stages = frozenset({"image"})
    trainable = False

    def __init__(
        self,
        *,
        data,
        losses: Sequence[Loss],
        num_images: int = 1024,
        synth_batch_size: int = 64,
        iterations: int = 500,
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        plateau_factor: float = 0.1,
        plateau_patience: int = 100,
        min_lr: float = 1e-4,
        init: str = "gaussian",
        labels: str = "random",
        target_prob_low: float | None = None,
        synth_augment_prob: float = 0.0,
        synth_crop_scale: tuple[float, float] | None = (0.5, 1.0),
        jitter: int = 0,
        crop_scale: tuple[float, float] | None = None,
        flip: bool = True,
        plateau_sync_every: int = 10,
        group_batches: int | None = None,
        parametrization: str = "pixels",
        genie_latent_dim: int = 256,
        genie_lr: float = 0.01,
        genie_gamma: float = 0.95,
        genie_step_every: int = 100,
        swing: bool = False,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(num_classes=data.num_classes, latent_dim=1)
        if not losses or not all(isinstance(loss, Loss) for loss in losses):
            raise ValueError(
                f"SyntheticSet.losses must be a non-empty list of losses, got {losses!r}"
            )
        self.synth_batch_size = _int("synth_batch_size", synth_batch_size, 1)
        self.num_images = _int("num_images", num_images, 1)
        if num_images % synth_batch_size:
            raise ValueError(
                f"SyntheticSet.num_images={num_images} must be a multiple of "
                f"synth_batch_size={synth_batch_size}"
            )
        self.iterations = _int("iterations", iterations, 1)
        self.plateau_patience = _int("plateau_patience", plateau_patience, 0)
        self.jitter = _int("jitter", jitter, 0)
        self.plateau_sync_every = _int("plateau_sync_every", plateau_sync_every, 1)
        self.seed = _int("seed", seed, 0)
        self.group_batches = (
            None if group_batches is None else _int("group_batches", group_batches, 1)
        )
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"SyntheticSet.parametrization must be one of {PARAMETRIZATIONS}, "
                f"got {parametrization!r}"
            )
        self.parametrization, self.swing = parametrization, bool(swing)
        self.genie_latent_dim = _int("genie_latent_dim", genie_latent_dim, 1)
        self.genie_step_every = _int("genie_step_every", genie_step_every, 1)
        self.genie_lr, self.genie_gamma = float(genie_lr), float(genie_gamma)
        if init not in INITS:
            raise ValueError(f"SyntheticSet.init must be one of {INITS}, got {init!r}")
        if labels not in LABELS:
            raise ValueError(f"SyntheticSet.labels must be one of {LABELS}, got {labels!r}")
        if not 0.0 <= synth_augment_prob <= 1.0:
            raise ValueError(
                f"SyntheticSet.synth_augment_prob must be in [0, 1], got {synth_augment_prob!r}"
            )
        if target_prob_low is not None and not 0.0 <= target_prob_low <= 1.0:
            raise ValueError(
                f"SyntheticSet.target_prob_low must be None or in [0, 1], got {target_prob_low!r}"
            )
        self.synth_losses = nn.ModuleList(losses)
        self.lr, self.betas = float(lr), tuple(float(b) for b in betas)
        self.plateau_factor, self.min_lr = float(plateau_factor), float(min_lr)
        self.init, self.label_mode, self.target_prob_low = init, labels, target_prob_low
        self.synth_augment_prob = float(synth_augment_prob)
        self.synth_crop_scale = _scale("synth_crop_scale", synth_crop_scale)
        self.crop_scale = _scale("crop_scale", crop_scale)
        self.flip = bool(flip)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.image_size, self.channels = data.image_size, data.channels
        self.data_key = (
            data.name,
            data.image_size,
            data.channels,
            tuple(data.mean),
            tuple(data.std),
        )
        self.register_buffer("images", torch.empty(0), persistent=False)
        self.register_buffer("labels", torch.empty(0, dtype=torch.long), persistent=False)
        self._rng = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0
        self.cache_path: Path | None = None

    # ---- stage two: serving
    def get_extra_state(self) -> dict:
        return {"rng_state": self._rng.get_state(), "order": self._order, "pos": self._pos}

    def set_extra_state(self, state: dict) -> None:
        self._rng.set_state(state["rng_state"])
        self._order, self._pos = state["order"], int(state["pos"])

    def _indices(self, n: int) -> torch.Tensor:
        parts, need = [], n
        while need:
            if self._pos >= len(self._order):
                self._order = torch.randperm(self.num_images, generator=self._rng)
                self._pos = 0
            take = self._order[self._pos : self._pos + need]
            self._pos += len(take)
            need -= len(take)
            parts.append(take)
        return torch.cat(parts)

    def sample(self, batch_size: int, device: torch.device) -> SynthBatch:
        if self.images.numel() == 0:
            raise RuntimeError("SyntheticSet was not bound to a teacher: no images yet")
        idx = self._indices(batch_size)
        images = self.images[idx].to(device, non_blocking=True)
        labels = self.labels[idx].to(device, non_blocking=True)
        if self.crop_scale is not None:
            theta = crop_boxes(
                batch_size, scale=self.crop_scale, flip=self.flip, generator=self._rng
            )
            images = apply_crops(images, theta)
        return SynthBatch(
            labels=labels, targets=F.one_hot(labels, self.num_classes).float(), images=images
        )

    def embed(self, labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        raise TypeError("SyntheticSet has no conditioning: it serves stored images")

    def decode(self, batch: SynthBatch) -> torch.Tensor:
        return batch.images

    # ---- stage one: synthesis
    def key(self, teacher: nn.Module) -> str:
        """Hash of the teacher's weights and buffers and of every synthesis setting."""
        h = hashlib.sha256()
        for name, t in teacher.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        settings = {
            "losses": [repr(loss) for loss in self.synth_losses],
            "data": repr(self.data_key),
            **{
                k: repr(getattr(self, k))
                for k in (
                    "num_images", "synth_batch_size", "iterations", "lr", "betas",
                    "plateau_factor", "plateau_patience", "min_lr", "init", "label_mode",
                    "target_prob_low", "synth_augment_prob", "synth_crop_scale", "jitter",
                    "flip", "seed", "group_batches", "parametrization", "swing",
                    "genie_latent_dim", "genie_lr", "genie_gamma", "genie_step_every",
                )
            },
        }  # fmt: skip
        h.update(json.dumps(settings, sort_keys=True).encode())
        return h.hexdigest()[:20]

    def bind(self, *, teacher: nn.Module, generator: nn.Module, example: torch.Tensor) -> None:
        """Load the set from the cache, synthesizing the batches that are not there."""
        if self.images.numel():
            return
        device = example.device
        root = (self.cache_dir or cache_root()) / self.key(teacher)
        root.mkdir(parents=True, exist_ok=True)
        self.cache_path = root
        n_batches = self.num_images // self.synth_batch_size
        rank, world = 0, 1
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
            self._rng.manual_seed(self.seed + 100_003 * rank)  # each process its own order
        todo = [k for k in range(n_batches) if not (root / f"batch_{k:04d}.safetensors").is_file()]
        looks_back = any(hasattr(loss, "observe") for loss in self.synth_losses)
        mine = [
            k for k in todo if (k % world == rank and not looks_back) or (looks_back and rank == 0)
        ]
        if todo and rank == 0:
            logger.info(
                f"synthesizing {len(todo)} of {n_batches} batches into {root} "
                f"({self.iterations} iterations each)"
            )
        if mine:
            self._synthesize(teacher, mine, root, example, show=rank == 0)
        if world > 1:
            dist.barrier()
        from safetensors.torch import load_file

        parts = [load_file(str(root / f"batch_{k:04d}.safetensors")) for k in range(n_batches)]
        self.images = torch.cat([p["images"] for p in parts])
        self.labels = torch.cat([p["labels"] for p in parts])
        if device.type == "cuda":
            self.images = self.images.pin_memory()

    def _initial(self, k: int, device: torch.device):
        gen = torch.Generator().manual_seed(self.seed + k)
        shape = (self.synth_batch_size, self.channels, self.image_size, self.image_size)
        if self.init == "gaussian":
            x = torch.randn(shape, generator=gen)
        else:  # ZeroQ: integers in [-128, 127] scaled to unit variance
            x = (torch.randint(-128, 128, shape, generator=gen).float()) / 5418.75**0.5
        b = self.synth_batch_size
        if self.label_mode == "balanced":
            labels = (torch.arange(b) + k * b) % self.num_classes
        else:
            labels = torch.randint(self.num_classes, (b,), generator=gen)
        mix = {}
        if self.target_prob_low is not None:
            low = self.target_prob_low
            t = low + (1 - low) * torch.rand(b, generator=gen)
            soft = torch.rand(b, generator=gen) < 0.5
            mix["target_prob"] = torch.where(soft, t, torch.ones(b)).to(device)
        return x.to(device), labels.to(device), mix, gen

    def _look_back(self, teacher, taps: Taps, root: Path, group: int, device) -> None:
        """Let the looking-back losses observe every image of the groups before ``group``."""
        from safetensors.torch import load_file

        watchers = [loss for loss in self.synth_losses if hasattr(loss, "observe")]
        for loss in watchers:
            loss.reset()
        for j in range(group * self.group_batches):
            part = load_file(str(root / f"batch_{j:04d}.safetensors"))
            images, labels = part["images"].to(device), part["labels"].to(device)
            with torch.no_grad(), taps:
                logits = teacher(images)
            step = Step(SynthBatch(labels=labels, images=images), logits, None,
                        teacher_taps=taps.collect(), epoch=0)  # fmt: skip
            for loss in watchers:
                loss.observe(loss.features(step), labels, self.num_classes)

    def _synthesize(self, teacher, batches, root: Path, example, *, show: bool) -> None:
        from safetensors.torch import save_file

        device = example.device
        needs = set().union(*(loss.needs for loss in self.synth_losses))
        parts = {loss.stage_parts for loss in self.synth_losses if "stages" in loss.needs}
        bn_users = ", ".join(
            type(loss).__name__ for loss in self.synth_losses if "bn_inputs" in loss.needs
        )
        taps = Taps(
            teacher, needs, model_name="the teacher", stage_parts=parts, example=example,
            bn_users=f"{bn_users} (in generators.SyntheticSet.losses): ZeroQ, DSG and Genie "
            "synthesize images by matching the teacher's BN statistics, so they cannot run on "
            "it; use a method that synthesizes without them (for example PSAQ-ViT's patch "
            "similarity, recipes/mnist/vit_psaq_w4a8.gin, or a generator recipe without "
            "BNStatsLoss)",
        )  # fmt: skip
        looks_back = self.group_batches is not None and any(
            hasattr(loss, "observe") for loss in self.synth_losses
        )
        group = None
        try:
            for k in tqdm(batches, desc="synthesis", disable=not show, leave=False):
                if looks_back and k // self.group_batches != group:
                    group = k // self.group_batches
                    self._look_back(teacher, taps, root, group, device)
                x, labels, mix, gen = self._initial(k, device)
                decoder, extra = None, []
                if self.parametrization == "generator":
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(self.seed + k)
                        decoder = GenieDecoder(
                            self.genie_latent_dim, self.image_size, self.channels
                        ).to(device)
                    x = torch.randn(x.shape[0], self.genie_latent_dim, generator=gen).to(device)
                    g_opt = torch.optim.Adam(decoder.parameters(), lr=self.genie_lr)
                    extra = [
                        g_opt,
                        torch.optim.lr_scheduler.StepLR(
                            g_opt, step_size=self.genie_step_every, gamma=self.genie_gamma
                        ),
                    ]
                x.requires_grad_(True)
                targets = F.one_hot(labels, self.num_classes).float()
                opt = torch.optim.Adam([x], lr=self.lr, betas=self.betas)
                plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                    opt,
                    factor=self.plateau_factor,
                    patience=self.plateau_patience,
                    min_lr=self.min_lr,
                )
                pending: list[torch.Tensor] = []
                swing = _Swing(teacher, gen) if self.swing else None
                for _ in range(self.iterations):
                    view = x if decoder is None else decoder(x)
                    if self.synth_augment_prob and torch.rand((), generator=gen) < (
                        self.synth_augment_prob
                    ):
                        view = random_resized_crop(
                            view, scale=self.synth_crop_scale, flip=self.flip, generator=gen
                        )
                    view = roll(view, self.jitter, generator=gen)
                    with taps:
                        logits = teacher(view)
                    batch = SynthBatch(labels=labels, targets=targets, images=view, mix=mix)
                    step = Step(batch, logits, None, teacher_taps=taps.collect(), epoch=0)
                    loss = sum(loss_fn(step) for loss_fn in self.synth_losses)
                    opt.zero_grad(set_to_none=True)
                    if extra:
                        extra[0].zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if extra:
                        extra[0].step()
                        extra[1].step()
                    pending.append(loss.detach())
                    if len(pending) == self.plateau_sync_every:
                        for value in torch.stack(pending).tolist():
                            plateau.step(value)
                        pending = []
                if swing is not None:
                    swing.remove()
                if decoder is not None:
                    with torch.no_grad():
                        x = decoder(x)
                out = {"images": x.detach().cpu().contiguous(), "labels": labels.cpu()}
                tmp = root / f".batch_{k:04d}.tmp"
                save_file(out, str(tmp))
                os.replace(tmp, root / f"batch_{k:04d}.safetensors")
        finally:
            taps.remove()
