"""A Triton Inference Server model repository from an exported folder, for Triton's onnxruntime backend.

Torch-free (it reads the manifest and copies files). Layout, per graph of the folder::

    REPOSITORY/<model>/config.pbtxt          inputs, outputs, dims, max_batch_size, dynamic batching
    REPOSITORY/<model>/1/<graph>.onnx        the graph under its own name (+ its .onnx.data), named by
                                             default_model_filename
    REPOSITORY/<model>/configs/sequence.pbtxt  causal-lm only: sequence batching, the KV cache kept as Triton's
                                             implicit state (tritonserver --model-config-name=sequence)
    REPOSITORY/<model>/ptuning_onnx.json, tokenizer files: for clients (Triton ignores them)

``<model>`` is the name given, or ``<name>_encoder`` / ``<name>_decoder`` for seq2seq-lm's two graphs. The
dims leave out the batch axis (Triton adds it when max_batch_size > 0) and give -1 for every axis whose length
varies. ``logits_to_keep`` is not declared: it is an optional input with a default inside the graph, so Triton's
backend (like onnxruntime's ``get_inputs``) does not see it, and every position's logits come back. What a client
does with the KV cache: docs/TRITON.md.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

from . import manifest as mf
from .errors import ConfigError

DATA_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
              "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(bool)": "TYPE_BOOL"}
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SEQUENCE_CONFIG = "sequence"  # configs/sequence.pbtxt
SEQUENCE_IDLE_US = 60_000_000  # a conversation idle for a minute gives its slot (and its KV state) back


def model_names(task: str, name: str) -> dict:
    """{graph name: Triton model name} for a folder of ``task``."""
    graphs = mf.TASK_GRAPHS[task]
    if len(graphs) == 1:
        return {graphs[0]: name}
    return {graph: f"{name}_{graph.split('_')[0]}" for graph in graphs}  # encoder_model -> <name>_encoder


def check_target(repository: os.PathLike, name: str, task: Optional[str] = None, *, overwrite: bool = False,
                 max_batch_size: int = 8) -> Path:
    """Refuse a bad model name, batch size or an occupied model folder, before anything is exported or written."""
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise ConfigError(f"Triton model name {name!r} must be 1-128 letters, digits, '_', '.' or '-', starting "
                          "with a letter or digit")
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
        raise ConfigError(f"Triton max batch size must be an integer >= 1, got {max_batch_size!r}")
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise ConfigError(f"Triton repository {repository} exists and is not a folder")
    names = model_names(task, name).values() if task else [name]
    for model in names:
        if (repository / model).exists() and not overwrite:
            raise ConfigError(f"Triton repository {repository} already has a model {model!r}; pass --overwrite "
                              "to replace it")
    return repository


def write_repository(folder: os.PathLike, repository: os.PathLike, *, name: Optional[str] = None,
                     max_batch_size: int = 8, max_queue_delay_us: int = 100, overwrite: bool = False) -> list:
    """Write Triton models for the export in ``folder`` under ``repository``; returns the model folders.

    ``name`` defaults to the folder's name. ``max_batch_size``: the most rows Triton puts in one run (dynamic
    batching joins requests whose shapes are equal, up to it). The folder is hash-checked first.
    """
    folder = Path(folder)
    manifest = mf.read_manifest(folder, verify=True)
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", folder.resolve().name)
    repository = check_target(repository, name, manifest["task"], overwrite=overwrite,
                              max_batch_size=max_batch_size)
    written = []
    for graph, model in model_names(manifest["task"], name).items():
        entry = manifest["graphs"][graph]
        target = repository / model
        if target.exists():
            shutil.rmtree(target)
        (target / "1").mkdir(parents=True)
        files = [entry["file"]] + ([entry["external_data"]] if entry.get("external_data") else [])
        for file in files:
            # The graph names its data file relatively, so both keep their names side by side under 1/.
            _link_or_copy(folder / file, target / "1" / file)
        config = model_config(model, manifest, graph, max_batch_size=max_batch_size,
                              max_queue_delay_us=max_queue_delay_us)
        (target / "config.pbtxt").write_text(config, encoding="utf-8")
        labels = _labels(manifest)
        if labels is not None:
            (target / "labels.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
        if manifest["task"] == "causal-lm":
            (target / "configs").mkdir()
            (target / "configs" / f"{SEQUENCE_CONFIG}.pbtxt").write_text(
                sequence_config(model, manifest, max_batch_size=max_batch_size,
                                max_queue_delay_us=max_queue_delay_us), encoding="utf-8")
        for file in (mf.MANIFEST_NAME, "config.json", "generation_config.json", *mf.TOKENIZER_FILES):
            if (folder / file).is_file():
                shutil.copy2(folder / file, target / file)
        written.append(target)
    return written


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows it (a multi-GB graph is then not stored twice), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _labels(manifest: dict) -> Optional[list]:
    id2label = manifest["model"].get("id2label")
    if manifest["task"] != "seq-cls" or not id2label:
        return None
    return [id2label[str(i)] for i in range(len(id2label))]


def _tensor(value: dict, extra: str = "") -> str:
    shape = value["shape"]
    if not shape or shape[0] != "batch":
        raise ConfigError(f"graph tensor {value['name']} has no leading batch axis ({shape}); Triton's batching "
                          "needs one")
    if value["type"] not in DATA_TYPES:
        raise ConfigError(f"graph tensor {value['name']} has type {value['type']}, which has no Triton data type "
                          f"here (known: {', '.join(sorted(DATA_TYPES))})")
    dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape[1:])
    if len(shape) == 1:  # (batch,), e.g. prompt_ids: Triton wants a dim; [1] per request, reshaped to a scalar
        dims, extra = "1", "    reshape: { shape: [ ] }\n" + extra
    return (f'  {{\n    name: "{value["name"]}"\n    data_type: {DATA_TYPES[value["type"]]}\n'
            f"    dims: [ {dims} ]\n{extra}  }}")


def _declared(entry: dict) -> list:
    """The graph's inputs Triton sees: those without a default inside the graph."""
    return [i for i in entry["inputs"] if i["name"] not in entry.get("defaults", {})]


def _head(model: str, max_batch_size: int, inputs: list, outputs: list, labels: bool) -> str:
    outs = [_tensor(o, '    label_filename: "labels.txt"\n' if labels and o["name"] == "logits" else "")
            for o in outputs]
    return (f'name: "{model}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch_size}\n'
            f"input [\n{_joined(_tensor(i) for i in inputs)}\n]\n"
            f"output [\n{_joined(outs)}\n]\n")


def _joined(items) -> str:
    return ",\n".join(items)  # (a backslash inside an f-string's braces needs Python 3.12)


def model_config(model: str, manifest: dict, graph: str, *, max_batch_size: int = 8,
                 max_queue_delay_us: int = 100) -> str:
    """config.pbtxt (protobuf text of Triton's ``inference.ModelConfig``) for one graph: stateless, dynamic batching."""
    entry = manifest["graphs"][graph]
    head = _head(model, max_batch_size, _declared(entry), entry["outputs"], _labels(manifest) is not None)
    return (f"# ptuning-onnx {manifest['task']} export, graph {entry['file']}; docs/TRITON.md\n{head}"
            f'default_model_filename: "{entry["file"]}"\n'
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n")


def sequence_config(model: str, manifest: dict, *, max_batch_size: int = 8, max_queue_delay_us: int = 100) -> str:
    """causal-lm: sequence batching with the KV cache as implicit state, so a client sends only its new tokens.

    Each ``past_key_values.{i}.*`` input is fed from the previous step's ``present.{i}.*`` of the same sequence
    (correlation id); the first step starts from an empty past (length 0).
    """
    entry = manifest["graphs"]["model"]
    past = [i for i in _declared(entry) if i["name"].startswith("past_key_values.")]
    plain = [i for i in _declared(entry) if not i["name"].startswith("past_key_values.")]
    outputs = [o for o in entry["outputs"] if not o["name"].startswith("present.")]
    states = []
    for value in past:
        _, heads, _, head_dim = value["shape"]
        kind = DATA_TYPES[value["type"]]
        states.append(
            f'    {{\n      input_name: "{value["name"]}"\n'
            f'      output_name: "{value["name"].replace("past_key_values", "present", 1)}"\n'
            f"      data_type: {kind}\n      dims: [ {heads}, -1, {head_dim} ]\n"
            f'      initial_state: {{\n        name: "empty past"\n        data_type: {kind}\n'
            f"        dims: [ {heads}, 0, {head_dim} ]\n        zero_data: true\n      }}\n    }}")
    return (f"# ptuning-onnx causal-lm export, graph {entry['file']}: the KV cache as implicit state; "
            f"docs/TRITON.md\n{_head(model, max_batch_size, plain, outputs, False)}"
            f'default_model_filename: "{entry["file"]}"\n'
            f"sequence_batching {{\n  max_sequence_idle_microseconds: {SEQUENCE_IDLE_US}\n"
            f"  oldest {{\n    max_candidate_sequences: {4 * max_batch_size}\n"
            f"    max_queue_delay_microseconds: {max_queue_delay_us}\n  }}\n"
            f"  state [\n{_joined(states)}\n  ]\n}}\n")
