"""Parse gin files and bindings, resolve includes from any working directory, finalize, save.

Gin files are looked up, in order, as given (relative to the working directory), then under each
directory of ``$DFQKIT_GIN_PATH`` (``os.pathsep``-separated), then under the dfqkit source tree
(the directory holding ``gin/`` and ``recipes/``). ``include 'gin/base.gin'`` inside a recipe
resolves the same way, so recipes run from anywhere.

A run directory stores its configuration self-contained: :func:`flatten` writes the given files
with every ``include`` replaced by the included text (recursively, in place), followed by the
command-line bindings, so parsing it gives the same bindings in the same order whatever the
source tree holds later. :func:`snapshot` is the parsed configuration as plain strings, to
compare two configurations binding by binding.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import gin
from gin import config as gin_config

import dfqkit.build  # noqa: F401  (gin-registers the root `train`)
import dfqkit.data  # noqa: F401  (gin-registers the datasets)
import dfqkit.data_free  # noqa: F401  (gin-registers the data-free evaluation set)
import dfqkit.optim  # noqa: F401  (gin-registers optimizers beyond torch.optim)
from dfqkit import bindings, registry
from dfqkit.errors import ConfigError


def _shipped_root() -> Path:
    """Where ``gin/`` and ``recipes/`` are: the source tree (a checkout, or an editable
    install), else the copies a wheel ships inside the package (``dfqkit/_shipped``)."""
    source = Path(__file__).resolve().parents[1]
    if (source / "gin" / "base.gin").is_file() and (source / "recipes").is_dir():
        return source
    return Path(__file__).resolve().parent / "_shipped"


#: the directory holding ``gin/`` and ``recipes/`` (searched last for gin files)
REPO_ROOT = _shipped_root()
STANDARD_MACROS = ("W_BITS", "A_BITS", "SEED", "EPOCHS", "ITERS_PER_EPOCH", "BATCH_SIZE")


__all__ = ["REPO_ROOT", "STANDARD_MACROS", "ConfigError", "flatten", "parse", "snapshot"]
INCLUDE = re.compile(r"""^\s*include\s+(['"])(?P<path>.+?)\1\s*(#.*)?$""")


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


def register_configurables() -> None:
    """Register every gin configurable (components, plugins, ``torch.optim``), so bindings can
    be checked."""
    registry.load_all()
    with warnings.catch_warnings():  # gin.torch touches deprecated torch names on import
        warnings.simplefilter("ignore")
        import gin.torch.external_configurables  # noqa: F401  (torch.optim.* bindings)


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


class _FileLookupFilter(logging.Filter):
    """gin logs every search-path probe of an included file ("Path not found: ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not msg.startswith(("Path not found", "system_path_file_exists"))


@contextlib.contextmanager
def _quiet_file_lookups() -> Iterator[None]:
    root, flt = logging.getLogger(), _FileLookupFilter()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def parse(
    gin_files: Sequence[str | os.PathLike],
    gin_params: Sequence[str] = (),
    *,
    finalize: bool = True,
    allow_required: bool = False,
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
    register_configurables()
    gin.clear_config()  # each parse starts from an empty, unlocked config (one run per parse)
    files = [resolve_gin_file(f) for f in gin_files]
    # gin looks for included files in this order, the same as resolve_gin_file and flatten.
    # No '' prefix: gin would also try a relative path as a resource of an importable package,
    # and crash on a namespace package (`recipes/` when the source tree is on sys.path).
    gin_config._LOCATION_PREFIXES[:] = [str(p) for p in search_paths()]
    try:
        with _quiet_file_lookups():
            gin.parse_config_files_and_bindings(
                [str(f) for f in files], list(gin_params), finalize_config=False
            )
    except ImportError as err:  # a gin `import` statement (a plug-in module)
        found = re.search(r"No module named '([\w.]+)'", str(err))
        module = err.name or (found.group(1) if found else "?")
        raise ConfigError(
            f"gin `import {module}` failed: {_short(err)}; the module must be importable from "
            f"the working directory ({os.getcwd()}) or the installed packages (sys.path)"
        ) from err
    except (ValueError, KeyError, TypeError, SyntaxError, OSError) as err:
        raise ConfigError(f"bad config: {_short(err)}{bindings.hint(str(err))}") from err
    missing = required_macros()
    if missing and not allow_required:
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


def _inline(path: Path, seen: tuple[Path, ...]) -> list[str]:
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"gin include cycle: {chain}")
    lines = []
    for line in path.read_text().splitlines():
        match = INCLUDE.match(line)
        if match is None:
            lines.append(line)
            continue
        target = resolve_gin_file(match.group("path"))
        lines.append(f"# ---- include {match.group('path')!r} ({target})")
        lines += _inline(target, (*seen, path))
        lines.append(f"# ---- end of {match.group('path')!r}")
    return lines


def flatten(gin_files: Sequence[str | os.PathLike], gin_params: Sequence[str] = ()) -> str:
    """The configuration as one self-contained gin text: each file with its includes inlined
    (recursively), then the command-line bindings. Parsing it binds exactly what parsing the
    files and bindings binds, in the same order."""
    parts = []
    for f in gin_files:
        path = resolve_gin_file(f)
        parts.append(f"# ---- {recipe_name(path)} ({path})\n" + "\n".join(_inline(path, ())))
    if gin_params:
        parts.append("# ---- command-line bindings\n" + "\n".join(gin_params))
    return "\n".join(parts) + "\n"


def snapshot() -> dict[str, dict[str, str]]:
    """The parsed configuration, ``{"scope/configurable": {parameter: repr(value)}}``; macros
    appear as ``{"NAME/gin.macro": {"value": ...}}``."""
    out: dict[str, dict[str, str]] = {}
    for (scope, selector), params in gin_config._CONFIG.items():
        key = f"{scope}/{selector}" if scope else selector
        out[key] = {name: repr(value) for name, value in params.items()}
    return out


def binding_names(snap: dict[str, dict[str, str]]) -> dict[str, str]:
    """A snapshot as ``{binding: value}``, with the names a user writes: ``EPOCHS``,
    ``train.epochs``, ``student/torch.optim.SGD.lr``."""
    flat = {}
    for key, params in snap.items():
        scope, _, selector = key.rpartition("/")
        for name, value in params.items():
            if selector == "gin.macro":
                flat[scope] = value
            else:
                short = selector.removeprefix("dfqkit.")
                flat[f"{scope}/{short}.{name}" if scope else f"{short}.{name}"] = value
    return flat


def save_operative_config(output_dir: Path) -> None:
    (output_dir / "operative_config.gin").write_text(gin.operative_config_str())
