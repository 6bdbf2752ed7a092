"""ONNX export of P-tuned models. ``export`` writes a folder; ``verify`` re-checks one."""

from .exporter import ExportResult, export, load_reference

__all__ = ["ExportResult", "export", "load_reference", "verify"]


def verify(*args, **kwargs):
    from ..parity import verify as _verify

    return _verify(*args, **kwargs)
