"""Everything this project takes from optimum-onnx, behind one module.

optimum-onnx 0.1.0 pins transformers < 4.58. We use two things from it: its per-architecture ONNX configs (which
inputs an architecture takes, e.g. whether BERT has ``token_type_ids``, and whether the architecture can be
exported for a task at all) and its ``ModelPatcher``, which swaps in vmap-free attention masks so the TorchScript
exporter works on transformers 4.57 (FACTS.md). Where optimum is missing, ``ROUTE`` falls back to torch.onnx's
dynamo exporter, which needs neither.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

from ..config import TaskType
from ..errors import ExportError

_OPTIMUM_TASKS = {
    TaskType.CAUSAL_LM: "text-generation-with-past",
    TaskType.SEQ_CLS: "text-classification",
    TaskType.TOKEN_CLS: "token-classification",
    TaskType.FEATURE_EXTRACTION: "feature-extraction",
    TaskType.SEQ_2_SEQ_LM: "text2text-generation-with-past",
}

try:  # import the model configs first, or TasksManager claims common architectures are unsupported
    import optimum.exporters.onnx.model_configs  # noqa: F401
    from optimum.exporters.tasks import TasksManager

    ROUTE = "torchscript+optimum-patcher"
except ImportError:  # pragma: no cover - exercised only without optimum installed
    TasksManager = None
    ROUTE = "dynamo"


def onnx_config(model, task: TaskType):
    """optimum's ONNX config for ``model`` and ``task``; unsupported pairs raise a clear ``ExportError``."""
    if TasksManager is None:
        return None
    model_type = getattr(model.config, "model_type", "?")
    try:
        ctor = TasksManager.get_exporter_config_constructor(
            "onnx", model, task=_OPTIMUM_TASKS[task], library_name="transformers"
        )
    except (ValueError, KeyError) as exc:
        raise ExportError(f"architecture '{model_type}' cannot be exported for task {task.value}: {exc}") from None
    return ctor(model.config)


def extra_inputs(model, task: TaskType) -> list[str]:
    """Optional standard inputs an architecture takes beyond input_ids/attention_mask (``token_type_ids``)."""
    cfg = onnx_config(model, task)
    if cfg is None:
        import inspect

        params = inspect.signature(model.forward).parameters
        return ["token_type_ids"] if "token_type_ids" in params else []
    return [name for name in cfg.inputs if name == "token_type_ids"]


@contextlib.contextmanager
def patched(model, task: TaskType):
    """Context in which ``torch.onnx.export(..., dynamo=False)`` can trace ``model``."""
    cfg = onnx_config(model, task)
    if cfg is None:
        yield
        return
    # optimum logs chatty notes about library_name and such; they mean nothing to our users.
    logging.getLogger("optimum").setLevel(logging.ERROR)
    # The patcher sets config.use_cache on every submodule and never restores it, which breaks a T5 encoder
    # used after the export (parity runs it). Restore what it changes.
    saved = [(m.config, m.config.use_cache) for m in model.modules()
             if hasattr(m, "config") and hasattr(m.config, "use_cache")]
    try:
        with cfg.patch_model_for_export(model):
            yield
    finally:
        for config, value in saved:
            config.use_cache = value


def versions() -> dict:
    out: dict[str, Optional[str]] = {}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "optimum", "peft"):
        try:
            from importlib.metadata import version

            out[name] = version(name if name != "optimum" else "optimum-onnx")
        except Exception:
            out[name] = None
    return out
