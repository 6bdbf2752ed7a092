"""P-tuning from training to production: PEFT-exact prompt encoders, ONNX export with proven parity, and a
torch-free onnxruntime runtime.

    from ptuning_onnx import PromptEncoderConfig, PromptEncoder, export, load, verify, assert_parity

Every name is imported on first use (PEP 562), so ``import ptuning_onnx``, ``from ptuning_onnx import load`` and
``PromptEncoderConfig`` stay torch-free (a service installs numpy, onnxruntime and tokenizers only);
``PromptEncoder``, ``export``, ``verify`` and ``assert_parity`` import torch when first touched.

``ptuning_onnx.export`` is the ``export()`` function, also after the ``ptuning_onnx.export`` subpackage has been
imported; reach the subpackage's other names with ``from ptuning_onnx.export import load_reference``.
"""

import importlib as _importlib
import sys as _sys
import types as _types

# public name -> (module that defines it, attribute)
_LAZY = {
    "PromptEncoderConfig": ("ptuning_onnx.config", "PromptEncoderConfig"),
    "PromptEncoder": ("ptuning_onnx.encoder", "PromptEncoder"),
    "export": ("ptuning_onnx.export", "export"),
    "load": ("ptuning_onnx.runtime", "load"),
    "verify": ("ptuning_onnx.parity", "verify"),
    "assert_parity": ("ptuning_onnx.parity", "assert_parity"),
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(_importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups find it without coming back here
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """Importing a subpackage binds it as an attribute of its parent. ``export`` is both a subpackage and the
    function it defines; without this, ``from ptuning_onnx import export`` would give the function or the module
    depending on what was imported before."""

    def __setattr__(self, name: str, value) -> None:
        if name == "export" and isinstance(value, _types.ModuleType) and value.__name__ == f"{__name__}.export":
            value = value.export
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
