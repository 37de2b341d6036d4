"""Every exception dfqkit raises on purpose, in one module that imports nothing of dfqkit.

The command lines print these as one line (``--debug`` shows the traceback):

* :class:`ConfigError` — the configuration or the input is wrong; found before any compute.
  The message names the field, the value and what is allowed. Exit code 2.
* :class:`SetupError` — anything that failed while building or starting a run (a component's
  constructor, loading weights, data or a checkpoint), before the first training step.
  Exit code 2.
* :class:`NonFiniteLossError` — too many steps in a row had a non-finite loss: the run stopped
  after its last complete checkpoint. Exit code 3.
* :class:`RegistryError` — an unknown component kind or name, or a duplicate registration.
* :class:`MissingDependency` — an optional package is missing; names the extra to install.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem found before any compute; the message says what to change."""


class SetupError(ConfigError):
    """An exception raised while building or starting a run, before its first training step,
    as one line."""


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient: the run is stopped."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the run directory and its last complete checkpoint, to say how
    to resume."""

    def __init__(self, output_dir, last_checkpoint) -> None:
        super().__init__(str(output_dir))
        self.output_dir = output_dir
        self.last_checkpoint = last_checkpoint


class RegistryError(KeyError):
    """Unknown kind, unknown name or duplicate registration."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingDependency(ImportError):
    """An optional package that a feature needs is not installed; the message names the extra
    to install (``pip install 'dfqkit[onnx]'``)."""
