"""Typed errors. Every message names the bad value; the CLIs print ``error: <message>`` and exit non-zero."""


class PtuningError(Exception):
    """Base class for every error this package raises on bad input."""


class ConfigError(PtuningError, ValueError):
    """An invalid configuration value."""


class AdapterError(PtuningError, ValueError):
    """A missing, unsafe or inconsistent adapter folder."""


class DataError(PtuningError, ValueError):
    """Bad training data; the message names the file and row."""


class ExportError(PtuningError, RuntimeError):
    """The export could not be made."""


class ParityError(PtuningError, AssertionError):
    """The ONNX graphs do not compute what the PyTorch reference computes (or the check itself is broken)."""


class ManifestError(PtuningError, ValueError):
    """An exported folder is missing files, has modified files, or an unknown format."""


class TrainingDivergedError(PtuningError, RuntimeError):
    """A training loss, gradient or weight became NaN or infinite; the last good checkpoint is left as it was."""
