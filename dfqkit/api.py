"""``dfqkit.quantize``: the recipe machinery on your own ``nn.Module``, without writing gin.

    import dfqkit
    student = dfqkit.quantize(model, method="diversity", w_bits=4, a_bits=4,
                              data="/data/imagenet/val", epochs=50)

``method`` is a method family (``gin/methods/<method>.gin``: ``gdfq``, ``diversity``,
``qimera``, ``ait``, ``adasg``, ``adadfq``, ``psaq_vit``, ...) or the path of a gin file.

The run is an ordinary run directory: ``config.gin`` names a factory that builds the model's
architecture again (:func:`dfqkit.models.find_architecture`) and reads its weights from
``teacher.safetensors`` in the directory, and names how to load the evaluation data (a folder,
a dfqkit data factory's call, or ``eval_data.safetensors`` in the directory). So
``python -m dfqkit.export --run DIR`` and ``python -m dfqkit.train --resume --output_dir DIR``
work on it like on any run. The returned student is the run's **best** checkpoint (the epoch
with the best validation top-1), quantized, activation ranges frozen, on the CPU, eval mode.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from dfqkit import config as cfg
from dfqkit.data import EvalData, save_eval_data
from dfqkit.errors import ConfigError
from dfqkit.models import find_architecture
from dfqkit.quant import set_quant_mode
from dfqkit.quant.attention import attention_modules
from dfqkit.registry import get
from dfqkit.rundir import record_model
from dfqkit.taps import bn_layers
from dfqkit.train import fit, start_run, summary_line

QUANT_FOR_METHOD = {  # a method's own quantizer; the others use GDFQ's (gin/quant/gdfq.gin)
    "diversity": "gin/quant/diversity.gin",
    "zeroq": "gin/quant/zeroq.gin",
    "dsg": "gin/quant/dsg.gin",
    "genie_d": "gin/quant/zeroq.gin",
    "genie": "gin/quant/genie.gin",
}
ADD_ONS = ("plugin",)  # fragments that extend a method rather than define one
TEACHER_FILE = "teacher.safetensors"
DATA_FILE = "eval_data.safetensors"


def _data_config(model: nn.Module, data: Any, image_size, mean, std) -> tuple[int, tuple, tuple]:
    """The model's input size, mean and std: from ``data`` when it is an EvalData, else the
    arguments, else the model's timm ``pretrained_cfg``."""
    if isinstance(data, EvalData):
        given = {"image_size": image_size, "mean": mean, "std": std}
        own = {"image_size": data.image_size, "mean": tuple(data.mean), "std": tuple(data.std)}
        clash = [
            k
            for k, v in given.items()
            if v is not None and (tuple(v) if k != "image_size" else v) != own[k]
        ]
        if clash:
            raise ValueError(
                f"quantize: {', '.join(clash)} given as "
                f"{', '.join(repr(given[k]) for k in clash)} but the EvalData says "
                f"{', '.join(repr(own[k]) for k in clash)}: leave them out (the data's are used)"
            )
        return own["image_size"], own["mean"], own["std"]
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


def _teacher_bindings(
    model: nn.Module, architecture: str | None, out: Path, shape: tuple[int, int, int]
) -> list[str]:
    """Save the model's weights into the run directory and return the gin bindings that build
    it again; check that the rebuilt model computes exactly what ``model`` computes."""
    arch = find_architecture(model, architecture)
    save_model(model, str(out / TEACHER_FILE))
    scope = f"models.{arch.factory}"
    lines = [
        f"train.teacher = @{scope}()",
        *arch.bindings(),
        f"{scope}.weights = @teacher/run_file()",
        f"teacher/run_file.name = {TEACHER_FILE!r}",
        "run_file.run_dir = %RUN_DIR",
    ]
    rebuilt = get("models", arch.factory)(**arch.kwargs, weights=str(out / TEACHER_FILE))
    probe = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model).cpu().eval()  # the caller's model stays as it is
    with torch.no_grad():
        same = torch.equal(rebuilt.eval()(probe), reference(probe))
    if not same:
        raise ValueError(
            f"quantize: the teacher rebuilt by @models.{arch.factory}({arch.kwargs}) with the "
            "saved weights does not compute what the given model computes; pass "
            "architecture='package.module:function' (a function without arguments that "
            "returns the float model)"
        )
    return lines


def _data_bindings(
    data: Any, images: Any, size: int, mean: tuple, std: tuple, channels: int, out: Path
) -> list[str]:
    """The gin bindings that load the evaluation data again (``EVAL_DATA``): labelled data, a
    folder of unlabelled images (labelled by the teacher), or none (a set distilled from the
    teacher)."""
    common = [f"image_size = {size}", f"mean = {tuple(mean)!r}", f"std = {tuple(std)!r}"]
    if data is None and images is None:
        return [
            "EVAL_DATA = @data.distilled_holdout()",
            "data.distilled_holdout.num_classes = %NUM_CLASSES",
            f"data.distilled_holdout.channels = {channels}",
            *(f"data.distilled_holdout.{c}" for c in common),
        ]
    if data is None:
        return [
            "EVAL_DATA = @data.unlabelled_folder()",
            f"data.unlabelled_folder.root = {str(Path(images).expanduser().resolve())!r}",
            "data.unlabelled_folder.num_classes = %NUM_CLASSES",
            f"data.unlabelled_folder.resize = {int(size / 0.875)}",
            *(f"data.unlabelled_folder.{c}" for c in common),
        ]
    if isinstance(data, EvalData):
        if data.source is not None:
            factory, kwargs = data.source
            lines = [f"EVAL_DATA = @data.{factory}()"]
            return lines + [f"data.{factory}.{k} = {v!r}" for k, v in kwargs.items()]
        save_eval_data(data, out / DATA_FILE)
        return [
            "EVAL_DATA = @data.saved()",
            "data.saved.path = @data/run_file()",
            f"data/run_file.name = {DATA_FILE!r}",
            "run_file.run_dir = %RUN_DIR",
        ]
    root = str(Path(data).expanduser().resolve())
    return [
        "EVAL_DATA = @data.imagenet_folder()",
        f"data.imagenet_folder.root = {root!r}",
        f"data.imagenet_folder.resize = {int(size / 0.875)}",
        *(f"data.imagenet_folder.{c}" for c in common),
    ]


def quantize(
    model: nn.Module,
    *,
    method: str | Path = "diversity",
    w_bits: int = 4,
    a_bits: int = 4,
    data: Any = None,
    images: str | Path | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channels: int | None = None,
    epochs: int | None = None,
    iters_per_epoch: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    output_dir: str | Path | None = None,
    gin_params: Sequence[str] = (),
    architecture: str | None = None,
) -> nn.Module:
    """Quantize ``model`` data-free with a method's recipe and return the quantized student.

    The epoch is selected on one of three evaluation sets (``metrics.json``'s ``evaluation``
    says which; the summary line says whether its figures are accuracy or agreement):

    * ``data=``: labelled images (an image-folder path, one sub-folder per class, or an
      :class:`~dfqkit.data.EvalData`): top-1 accuracy;
    * ``images=``: a folder of unlabelled images, labelled by the float model: top-1 is
      agreement with the float model (fidelity, not accuracy);
    * neither: fully data-free, a set of images distilled from the teacher before training
      (never trained on): agreement with the float model on the teacher's own distilled data
      (:func:`dfqkit.data_free.distilled_holdout`).

    Args:
        model: a float classifier ``(b, c, s, s) → (b, classes)``; it is not modified.
        method: a method family name or a gin file path.
        w_bits, a_bits: bit widths.
        data: labelled evaluation data (optional, see above).
        images: a folder of unlabelled images (optional, see above).
        image_size, mean, std: the model's input (default: the EvalData's, else the model's
            timm ``pretrained_cfg``).
        channels: input channels (default: the EvalData's, else 3).
        epochs, iters_per_epoch, batch_size: the budget (default: the method's; the budget is
            printed before training).
        seed: the run's seed.
        output_dir: the run directory (default: a new temporary directory).
        gin_params: extra ``"KEY = VALUE"`` bindings.
        architecture: ``'package.module:function'`` building the float model without
            arguments, for a model dfqkit cannot rebuild by itself (see
            :func:`dfqkit.models.find_architecture`).

    Returns:
        The quantized student of the best validation epoch (CPU, eval mode, activation ranges
        frozen); ``student.run_dir`` is the run directory, whose ``metrics.json`` records which
        epoch was returned (``models``).
    """
    if data is not None and images is not None:
        raise ValueError("quantize: pass data= (labelled) or images= (unlabelled), not both")
    size, mean, std = _data_config(model, data, image_size, mean, std)
    if data is not None and not isinstance(data, EvalData) and not Path(data).expanduser().is_dir():
        raise ValueError(f"quantize: data={str(data)!r} is not a folder of images")
    if images is not None and not Path(images).expanduser().is_dir():
        raise ValueError(f"quantize: images={str(images)!r} is not a folder of images")
    if channels is None:
        channels = data.channels if isinstance(data, EvalData) else 3
    vit = bool(attention_modules(model))
    quant = "gin/quant/vit.gin" if vit else QUANT_FOR_METHOD.get(str(method), "gin/quant/gdfq.gin")
    files = ["gin/base.gin", _method_file(method), quant]
    out = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="dfqkit_"))
    out.mkdir(parents=True, exist_ok=True)
    teacher = _teacher_bindings(model, architecture, out, (channels, size, size))
    with torch.no_grad():
        probe = torch.zeros(1, channels, size, size)
        num_classes = copy.deepcopy(model).cpu().eval()(probe).shape[-1]
    params = [
        f"NUM_CLASSES = {num_classes}",
        f"IMAGE_SIZE = {size}",
        f"CHANNELS = {channels}",
        *_data_bindings(data, images, size, mean, std, channels, out),
        f"W_BITS = {w_bits}",
        f"A_BITS = {a_bits}",
        f"SEED = {seed}",
        *teacher,
        "train.data = %EVAL_DATA",
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
    recipe = f"dfqkit.quantize(method={str(method)!r})"
    run, resumed_from = start_run(
        files, list(gin_params), output_dir=out, recipe=recipe, trusted=params
    )
    print(_budget_line(run, method, w_bits, a_bits, given=epochs is not None))
    metrics = fit(run, resumed_from=resumed_from)
    which = "best" if run.checkpoint_path("best") is not None else "last"
    if run.load(which) is None:
        raise ConfigError(f"quantize: the run in {str(out)!r} left no checkpoint")
    student = run.student_module.cpu().eval()
    set_quant_mode(student, "frozen")
    record_model(out, out / "dfqkit.quantize", run.loaded)
    print(summary_line(metrics))
    if metrics.get("note"):
        print(metrics["note"])
    student.run_dir = str(out)
    return student


def _budget_line(run, method, w_bits: int, a_bits: int, *, given: bool) -> str:
    s = run.schedule
    budget = (
        f"{s.epochs} epochs × {s.iters_per_epoch} iterations of batch {s.batch_size} "
        f"({s.warmup_epochs} warm-up)"
    )
    hint = "" if given else " (the method's default: pass epochs=, iters_per_epoch=, batch_size=)"
    measure = (
        "agreement with the float teacher" if run.data.labelled_by == "teacher" else "accuracy"
    )
    return (
        f"dfqkit.quantize: {method} at W{w_bits}A{a_bits}, {budget}{hint}; evaluated on "
        f"{run.data.name} ({measure}); run directory: {run.output_dir}"
    )
