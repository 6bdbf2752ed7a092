"""``load(folder)``: a verified folder's sessions, as the model object of its task."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .. import manifest as mf
from ..errors import ConfigError, ManifestError
from .encoders import FeatureExtractor, SequenceClassifier, TokenClassifier
from .model import CausalLM, RuntimeModel, Seq2SeqLM, _Generative
from .session import DECODING_CONFIG, build_sessions, log


TASK_CLASSES = {cls.task: cls for cls in (CausalLM, Seq2SeqLM, SequenceClassifier, TokenClassifier, FeatureExtractor)}


def load(path: Union[str, os.PathLike], provider: str = "auto", threads: Optional[int] = None,
         verify: Union[bool, str] = True) -> RuntimeModel:
    """Load an exported folder for inference; returns the task's model class.

    ``verify``: True re-hashes every file against the manifest's sha256 before any graph is parsed; ``"golden"``
    also runs the folder's ``golden.npz`` through the loaded model (runtime/golden.py) and raises
    ``GoldenMismatchError`` when it differs from the PyTorch reference's outputs (``NoGoldenError`` when the folder
    has none); the report is ``model.golden_report``. False checks nothing. ``provider``: ``"auto"`` (CUDA when it
    works, else CPU; logged), ``"cpu"``, ``"cuda"`` / ``"cuda:N"`` (raises when CUDA is not really used).
    ``threads``: onnxruntime intra-op threads per session (None: onnxruntime's default).
    """
    if not (verify is True or verify is False or verify == "golden"):
        raise ConfigError(f"verify must be True, False or 'golden', got {verify!r}")
    folder = Path(path)
    manifest = mf.read_manifest(folder, verify=verify is not False)
    task = manifest["task"]
    graphs = mf.TASK_GRAPHS[task]
    missing = [g for g in graphs if g not in manifest.get("graphs", {})]
    if missing:
        raise ManifestError(f"manifest of {folder} lacks graphs {missing} for task {task}")
    paths = {g: mf.graph_path(folder, manifest, g) for g in graphs}
    _check_onnxruntime(folder, manifest)
    generative = issubclass(TASK_CLASSES[task], _Generative)
    sessions, device, device_id = build_sessions(paths, provider, threads,
                                                 DECODING_CONFIG if generative else None)
    dtype = manifest.get("dtype", "fp32")
    if device == "cuda" and dtype == "fp32":
        log.info("ptuning_onnx.runtime: fp32 graphs on CUDA; an fp16 export (--dtype fp16) halves memory traffic")
    elif device == "cpu" and dtype == "fp16":
        log.warning("ptuning_onnx.runtime: fp16 graphs on CPU are slow; export fp32 for CPU serving")
    model = TASK_CLASSES[task](folder, manifest, sessions, device, device_id)
    if verify == "golden":
        from .golden import verify_golden

        model.golden_report = verify_golden(model)
    return model


def _check_onnxruntime(folder: Path, manifest: dict) -> None:
    """A graph that needs a newer onnxruntime than this one (``optimization.min_onnxruntime``) is refused by name,
    before onnxruntime fails on it with a schema error."""
    import onnxruntime as ort

    needed = (manifest.get("optimization") or {}).get("min_onnxruntime")
    if needed and mf.version_tuple(ort.__version__) < mf.version_tuple(needed):
        raise ConfigError(f"{folder}: its fused graph needs onnxruntime >= {needed}; this is "
                          f"{ort.__version__} (upgrade onnxruntime, or export without --optimize)")
