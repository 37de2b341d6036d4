"""Parse gin files and bindings, resolve includes from any working directory, finalize, save.

Gin files are looked up, in order, as given (relative to the working directory), then under each
directory of ``$DFQKIT_GIN_PATH`` (``os.pathsep``-separated), then under the dfqkit source tree
(the directory holding ``gin/`` and ``recipes/``). ``include 'gin/base.gin'`` inside a recipe
resolves the same way, so recipes run from anywhere.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import gin
from gin import config as gin_config

REPO_ROOT = Path(__file__).resolve().parents[1]
STANDARD_MACROS = ("W_BITS", "A_BITS", "SEED", "EPOCHS", "ITERS_PER_EPOCH", "BATCH_SIZE")


class ConfigError(ValueError):
    """A configuration problem found before any compute; the message says what to change."""


def search_paths() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("DFQKIT_GIN_PATH", "").split(os.pathsep) if p]
    return [Path.cwd(), *extra, REPO_ROOT]


def resolve_gin_file(path: str | os.PathLike) -> Path:
    """The absolute path of a gin file named relative to any search path."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        if candidate.is_file():
            return candidate
    else:
        for root in search_paths():
            if (root / candidate).is_file():
                return (root / candidate).resolve()
    looked = ", ".join(str(p) for p in search_paths())
    raise ConfigError(f"gin file {str(path)!r} not found (looked in: {looked})")


def _register_configurables() -> None:
    """Import everything that registers gin configurables, so bindings can be checked."""
    from dfqkit import registry

    registry.load_all()
    with warnings.catch_warnings():  # gin.torch touches deprecated torch names on import
        warnings.simplefilter("ignore")
        import gin.torch.external_configurables  # noqa: F401  (torch.optim.* bindings)

    import dfqkit.api  # noqa: F401  (gin-registers the models handed to dfqkit.quantize)
    import dfqkit.data  # noqa: F401  (gin-registers the datasets)
    import dfqkit.optim  # noqa: F401  (gin-registers optimizers beyond torch.optim)
    import dfqkit.train  # noqa: F401  (gin-registers the root `train`)


def _short(err: Exception) -> str:
    text = str(err).strip()
    # gin appends a location block ("In file ..., line N") after the first line; keep both short.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    where = next(
        (ln for ln in lines if ln.startswith("In file") or ln.startswith("In bindings")), ""
    )
    head = lines[0] if lines else type(err).__name__
    return f"{head} ({where})" if where and where != head else head


def one_line(err: BaseException) -> str:
    """An exception as one line; gin's "In call to configurable 'X'" note becomes "(in X)"."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    where = [ln for ln in lines[1:] if ln.startswith("In call to configurable")]
    if where:
        name = where[0].split("'")[1] if "'" in where[0] else where[0]
        return f"{lines[0]} (in {name})"
    return lines[0]


def required_macros() -> list[str]:
    """Macros whose value is still ``%gin.REQUIRED`` after parsing."""
    missing = []
    for (scope, selector), params in gin_config._CONFIG.items():
        if selector == "gin.macro" and repr(params.get("value")) == "%gin.REQUIRED":
            missing.append(scope)
    return sorted(missing)


def macro_value(name: str, default=None):
    """The parsed value of a macro, or ``default`` when it is not bound."""
    try:
        return gin.query_parameter(f"%{name}")
    except ValueError:
        return default


def parse(
    gin_files: Sequence[str | os.PathLike],
    gin_params: Sequence[str] = (),
    *,
    finalize: bool = True,
) -> list[Path]:
    """Parse gin files and ``KEY = VALUE`` bindings; fail early and briefly on any problem.

    Returns:
        The resolved gin file paths.

    Raises:
        ConfigError: unknown file, configurable or parameter, a parse error, or a macro still
            REQUIRED (naming the macro and how to set it).
    """
    if not gin_files:
        raise ConfigError("no gin file given: pass --gin RECIPE.gin (see recipes/)")
    _register_configurables()
    gin.clear_config()  # each parse starts from an empty, unlocked config (one run per parse)
    files = [resolve_gin_file(f) for f in gin_files]
    known = set(gin_config._LOCATION_PREFIXES)
    for root in reversed(search_paths()):
        if str(root) not in known:
            gin.add_config_file_search_path(str(root))
    try:
        gin.parse_config_files_and_bindings(
            [str(f) for f in files], list(gin_params), finalize_config=False
        )
    except (ValueError, KeyError, TypeError, SyntaxError, OSError) as err:
        raise ConfigError(f"bad config: {_short(err)}") from err
    missing = required_macros()
    if missing:
        hints = " ".join(f"--gin_param \"{m} = '...'\"" for m in missing)
        raise ConfigError(f"required macro(s) not set: {', '.join(missing)}; pass {hints}")
    if finalize:
        gin.finalize()
    return files


def recipe_name(path: Path) -> str:
    """A stable name for a recipe file: its path relative to the source tree when inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def run_name(path: Path) -> str:
    name = recipe_name(path)
    name = re.sub(r"^recipes/", "", name)
    return re.sub(r"\.gin$", "", name).replace("/", "_")


def save_config(output_dir: Path, gin_files: Sequence[Path], gin_params: Sequence[str]) -> None:
    """Write ``config.gin``: the given files' text and the command-line bindings."""
    parts = []
    for f in gin_files:
        parts.append(f"# ---- {f}\n{f.read_text()}")
    if gin_params:
        parts.append("# ---- command-line bindings\n" + "\n".join(gin_params))
    (output_dir / "config.gin").write_text("\n".join(parts) + "\n")


def save_operative_config(output_dir: Path) -> None:
    (output_dir / "operative_config.gin").write_text(gin.operative_config_str())
