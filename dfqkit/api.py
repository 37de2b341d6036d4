"""``dfqkit.quantize``: the recipe machinery on your own ``nn.Module``, without writing gin.

    import dfqkit
    student = dfqkit.quantize(model, method="diversity", w_bits=4, a_bits=4,
                              data="/data/imagenet/val", epochs=50)

``method`` is a method family (``gin/methods/<method>.gin``: ``gdfq``, ``diversity``,
``qimera``, ``ait``, ``adasg``, ``adadfq``, ``psaq_vit``) or the path of a gin file. The
model's input size, mean and std come from its timm ``pretrained_cfg`` when it has one, else
from the arguments; the number of classes from the data. The run directory is the trainer's own
(``config.gin``, checkpoints, ``metrics.json``); the returned student is its quantized model
with frozen activation ranges, on the CPU, in eval mode.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin
from torch import nn

from dfqkit import config as cfg

_PROVIDED: dict[str, Any] = {}
QUANT_FOR_METHOD = {  # a method's own quantizer; the others use GDFQ's (gin/quant/gdfq.gin)
    "diversity": "gin/quant/diversity.gin",
    "zeroq": "gin/quant/zeroq.gin",
    "dsg": "gin/quant/dsg.gin",
    "genie_d": "gin/quant/zeroq.gin",
    "genie": "gin/quant/genie.gin",
}
ADD_ONS = ("plugin",)  # fragments that extend a method rather than define one


@gin.configurable("provided_model", module="dfqkit.api")
def provided_model() -> nn.Module:
    """The model handed to :func:`quantize` (gin: ``@api.provided_model()``)."""
    return _PROVIDED["model"]


@gin.configurable("provided_data", module="dfqkit.api")
def provided_data():
    """The evaluation data handed to :func:`quantize` (gin: ``@api.provided_data()``)."""
    return _PROVIDED["data"]


def _data_config(model: nn.Module, image_size, mean, std) -> tuple[int, tuple, tuple]:
    pretrained = getattr(model, "pretrained_cfg", None) or {}
    if image_size is None and "input_size" in pretrained:
        image_size = pretrained["input_size"][-1]
    mean = tuple(mean if mean is not None else pretrained.get("mean", ()))
    std = tuple(std if std is not None else pretrained.get("std", ()))
    missing = [n for n, v in (("image_size", image_size), ("mean", mean), ("std", std)) if not v]
    if missing:
        raise ValueError(
            f"quantize: {', '.join(missing)} not given and the model has no timm "
            "pretrained_cfg to take them from; pass them explicitly"
        )
    return int(image_size), mean, std


def _method_file(method: str | Path) -> str:
    path = Path(method)
    if path.suffix == ".gin":
        return str(path)
    fragment = f"gin/methods/{method}.gin"
    known = sorted(p.stem for p in (cfg.REPO_ROOT / "gin" / "methods").glob("*.gin"))
    known = [k for k in known if k not in ADD_ONS]
    if method not in known:
        raise ValueError(f"method={method!r} is no method family ({', '.join(known)}) or gin file")
    return fragment


def quantize(
    model: nn.Module,
    *,
    method: str | Path = "diversity",
    w_bits: int = 4,
    a_bits: int = 4,
    data: Any = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    epochs: int | None = None,
    iters_per_epoch: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    output_dir: str | Path | None = None,
    gin_params: Sequence[str] = (),
) -> nn.Module:
    """Quantize ``model`` data-free with a method's recipe and return the quantized student.

    Args:
        model: a float classifier ``(b, c, s, s) → (b, classes)``; it is not modified.
        method: a method family name or a gin file path.
        w_bits, a_bits: bit widths.
        data: evaluation data: an image-folder path (one sub-folder per class) or an
            :class:`~dfqkit.data.EvalData`; required (the best epoch is chosen on it).
        image_size, mean, std: the model's input (default: its timm ``pretrained_cfg``).
        epochs, iters_per_epoch, batch_size: the budget (default: the method's).
        seed: the run's seed.
        output_dir: the run directory (default: a new temporary directory).
        gin_params: extra ``"KEY = VALUE"`` bindings.

    Returns:
        The quantized student (CPU, eval mode, activation ranges frozen).
    """
    from dfqkit.data import EvalData, imagenet_folder
    from dfqkit.quant.attention import attention_modules
    from dfqkit.taps import bn_layers
    from dfqkit.train import load_run, run

    if data is None:
        raise ValueError("quantize: data is required (an image folder path or an EvalData)")
    size, mean, std = _data_config(model, image_size, mean, std)
    if not isinstance(data, EvalData):
        data = imagenet_folder(
            root=str(data), image_size=size, resize=int(size / 0.875), mean=mean, std=std
        )
    vit = bool(attention_modules(model))
    quant = "gin/quant/vit.gin" if vit else QUANT_FOR_METHOD.get(str(method), "gin/quant/gdfq.gin")
    files = ["gin/base.gin", _method_file(method), quant]
    params = [
        f"NUM_CLASSES = {data.num_classes}",
        f"IMAGE_SIZE = {size}",
        f"CHANNELS = {data.channels}",
        "EVAL_DATA = @api.provided_data()",
        f"W_BITS = {w_bits}",
        f"A_BITS = {a_bits}",
        f"SEED = {seed}",
        "train.teacher = @api.provided_model()",
        "train.data = @api.provided_data()",
    ]
    params += [
        f"{k} = {v}"
        for k, v in (
            ("EPOCHS", epochs),
            ("ITERS_PER_EPOCH", iters_per_epoch),
            ("BATCH_SIZE", batch_size),
        )
        if v is not None
    ]
    if not bn_layers(model):  # a BN-free model (a ViT) takes no BN-statistics loss
        params.append("losses.BNStatsLoss.weight = 0.0")
    params += list(gin_params)
    out = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="dfqkit_"))
    _PROVIDED.update(model=copy.deepcopy(model), data=data)  # the caller's model stays as is
    try:
        run(files, params, output_dir=out)
        student = load_run(out)["student_module"].cpu()
    finally:
        _PROVIDED.clear()
    student.run_dir = str(out)
    return student
