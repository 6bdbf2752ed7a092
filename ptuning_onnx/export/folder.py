"""The steps of writing an export folder that ``export()`` (exporter.py) and ``export_multi()`` (multi.py) share:
the output checked, graphs traced, side files copied, the manifest built, parity failures reported beside the
output, and the finished folder hashed and swapped into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

from .. import manifest as mf
from .._fs import check_target, recover_interrupted, swap_in
from ..config import TASK_TO_CLI, TaskType
from ..errors import ConfigError, ExportError, ParityError
from ..reference import PTuningModel
from . import _optimum, graph_io
from .optimize import quantization_entry
from .wrappers import CausalLMGraph, EncoderTaskGraph, GraphSpec, Seq2SeqDecoderGraph, Seq2SeqEncoderGraph


def finalize(tmp: Path, manifest: dict, output: Path) -> None:
    """Hash every file once the folder is final (4.4 GB take ~8 s on a 1.1B model), write the manifest last (a
    folder without one never looks like a finished export), and swap the folder into place."""
    manifest["files"] = mf.hash_files(tmp, [p.name for p in tmp.iterdir()
                                            if p.is_file() and p.name != mf.MANIFEST_NAME])
    mf.write_manifest(tmp, manifest)
    _install(tmp, output)


def verified(check, output: Path) -> dict:
    """Run a parity ``check``; on failure write ``<output>.parity-report.json`` and name it in the error."""
    try:
        return check()
    except ParityError as exc:
        failed = output.with_name(output.name + ".parity-report.json")
        if getattr(exc, "report", None) is not None:
            failed.write_text(json.dumps(exc.report, indent=2, sort_keys=True))
            exc.args = (f"{exc.args[0]} (report: {failed})",)
        raise


def check_output(output: os.PathLike, overwrite: bool) -> Path:
    path = check_target(output)
    recover_interrupted(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {path} is not empty; pass --overwrite to replace an earlier export")
    return path


ROUTES = ("auto", "torchscript", "dynamo")


def resolve_route(route: str) -> str:
    if route not in ROUTES:
        raise ConfigError(f"unknown exporter {route!r}; expected one of: {', '.join(ROUTES)}")
    if route == "auto":
        return _optimum.ROUTE
    if route == "torchscript":
        if _optimum.TasksManager is None:
            raise ConfigError("the torchscript exporter needs optimum-onnx (pip install optimum-onnx); "
                              "or use --exporter dynamo")
        return _optimum.ROUTE
    import importlib.util

    if importlib.util.find_spec("onnxscript") is None:
        raise ConfigError("the dynamo exporter needs onnxscript (pip install onnxscript)")
    return "dynamo"


def _dynamic_shapes(wrapper, spec: GraphSpec, example) -> tuple:
    """torch.export ``Dim``s from the spec's named axes; one ``Dim`` per name, shared across inputs.

    Past lengths may be 0; the attention mask's length gets its own ``Dim`` because past + sequence cannot be
    expressed (FACTS.md)."""
    import inspect

    from torch.export import Dim

    dims: dict = {}

    def axes(name):
        return {axis: dims.setdefault(label, Dim(label, min=0 if "past" in label else 1, max=1 << 16))
                for axis, label in spec.dynamic_axes.get(name, {}).items()} or None

    names = iter(spec.inputs)
    shapes = []
    for _, value in zip(inspect.signature(wrapper.forward).parameters, example, strict=False):
        shapes.append([axes(next(names)) for _ in value] if isinstance(value, (list, tuple)) else axes(next(names)))
    return tuple(shapes)


def export_graphs(ref: PTuningModel, folder: Path, opset: int, route: str,
                   external_data: Optional[bool] = None, make_wrappers=None) -> list[GraphSpec]:
    """Trace ``ref``'s graphs into ``folder``; ``make_wrappers()`` builds other modules to trace over the same base
    (the multi-prompt export's, export/multi.py)."""
    task = ref.task
    if route != "dynamo":
        _optimum.onnx_config(ref.base, task)  # raises a clear ExportError for unsupported architecture/task pairs
    try:
        if make_wrappers is not None:
            wrappers = make_wrappers()
        elif task == TaskType.CAUSAL_LM:
            wrappers = [CausalLMGraph(ref)]
        elif task == TaskType.SEQ_2_SEQ_LM:
            wrappers = [Seq2SeqEncoderGraph(ref), Seq2SeqDecoderGraph(ref)]
        else:
            wrappers = [EncoderTaskGraph(ref, _optimum.extra_inputs(ref.base, task))]
    except Exception as exc:
        raise ExportError(f"'{ref.base.config.model_type}' cannot be exported for task {task.value}: "
                          f"{type(exc).__name__}: {exc}") from exc
    specs = []
    for wrapper in wrappers:
        spec = wrapper.spec()
        path = folder / f"{spec.name}.onnx"
        example = wrapper.example()
        patch = contextlib.nullcontext() if route == "dynamo" else _optimum.patched(ref.base, task)
        with torch.no_grad(), warnings.catch_warnings(), patch, contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")  # tracer warnings about python branches are expected and checked by parity
            try:
                if route == "dynamo":
                    torch.onnx.export(wrapper.eval(), example, str(path), dynamo=True, opset_version=opset,
                                      input_names=spec.inputs, output_names=spec.outputs,
                                      dynamic_shapes=_dynamic_shapes(wrapper, spec, example), verbose=False)
                else:
                    torch.onnx.export(wrapper.eval(), example, str(path), dynamo=False, opset_version=opset,
                                      input_names=spec.inputs, output_names=spec.outputs,
                                      dynamic_axes=spec.dynamic_axes, do_constant_folding=True)
            except Exception as exc:
                raise ExportError(f"tracing {spec.name} of '{ref.base.config.model_type}' failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        # Optional inputs get their default as an initializer of the same name (ONNX IR >= 4 semantics), and the
        # weights land in the graph or in one data file beside it (graph_io).
        graph_io.finalize(path, defaults=spec.defaults, external=external_data)
        specs.append(spec)
    return specs


def copy_side_files(base_dir: Path, ref: PTuningModel, folder: Path) -> None:
    # The loaded config, not the file: it carries the adapter's label names as id2label.
    ref.base.config.save_pretrained(folder)
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", folder)
    found = [name for name in mf.TOKENIZER_FILES if (base_dir / name).is_file()]
    for name in found:
        shutil.copy2(base_dir / name, folder / name)
    if "tokenizer.json" not in found:
        warnings.warn(f"base model {base_dir} has no tokenizer.json; the export runs on token ids only",
                      stacklevel=3)


def _io(values) -> list:
    """[{name, type, shape}] from ONNX ValueInfos, in onnxruntime's spelling ("tensor(float)", dim names)."""
    from onnx import TensorProto

    out = []
    for value in values:
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        out.append({"name": value.name, "type": f"tensor({TensorProto.DataType.Name(tensor.elem_type).lower()})",
                    "shape": [d if isinstance(d, int) else str(d) for d in shape]})
    return out


def build_manifest(ref: PTuningModel, folder: Path, specs, base_dir: Path, adapter_dir: Path, adapter_cfg,
                    opset, dtype, quantize, optimization, route, int4_block_size: Optional[int] = None) -> dict:
    cfg = ref.base.config
    graphs = {}
    for spec in specs:
        # Read from the graph's structure alone: a session would load (and pack) every weight of a large model.
        graph = graph_io.load(folder / f"{spec.name}.onnx", data=False).graph
        # onnxruntime lists optional inputs (an initializer of the same name) apart, after the required ones.
        initialized = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initialized] + [i for i in graph.input if i.name in initialized]
        entry = {"file": f"{spec.name}.onnx", "inputs": _io(inputs), "outputs": _io(graph.output),
                 "defaults": spec.defaults}
        data = folder / graph_io.data_name(folder / entry["file"])
        if data.exists():
            entry["external_data"] = data.name
        graphs[spec.name] = entry
    limit = next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions") if getattr(cfg, k, None)), None)
    decoder_layers = getattr(cfg, "num_decoder_layers", None)
    manifest = {
        "format": mf.FORMAT_NAME,
        "format_version": mf.FORMAT_VERSION,
        "task": TASK_TO_CLI[ref.task],
        "num_virtual_tokens": ref.n,
        "token_dim": int(ref.table.shape[1]),
        "adapter_config": adapter_cfg.to_dict(),
        "adapter": {"path": str(adapter_dir.resolve())},
        "base_model": {
            "name_or_path": str(base_dir.resolve()),
            "model_type": cfg.model_type,
            "architectures": cfg.architectures,
            "config_sha256": mf.sha256_file(base_dir / "config.json"),
        },
        "model": {
            "vocab_size": int(ref.base.get_input_embeddings().weight.shape[0]),
            # Limit on the USER's tokens (prompt + generated included): the model's positions minus the prompt.
            "max_user_tokens": (int(limit) - ref.n) if limit else None,
            "num_layers": decoder_layers or getattr(cfg, "num_hidden_layers", None),
            "pad_token_id": cfg.pad_token_id,
            "eos_token_id": cfg.eos_token_id,
            "bos_token_id": getattr(cfg, "bos_token_id", None),
            "decoder_start_token_id": getattr(cfg, "decoder_start_token_id", None),
            "padding_side": ref.padding_side,
            "id2label": {str(k): v for k, v in cfg.id2label.items()}
            if ref.task in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS) else None,
            # True: present.* hold the prompt's n positions before the user's, and so must a past given back.
            "cache_holds_prompt": bool(optimization and optimization.get("cache_holds_prompt")),
            # True: past_key_values.* and present.* may be one preallocated (B, KV, M, D) buffer bound to both; the
            # Llama builder's graphs, the ones whose cache holds the prompt, take it (build_llama.py).
            "past_present_share_buffer": bool(optimization and optimization.get("cache_holds_prompt")),
        },
        "graphs": graphs,
        "opset": opset,
        "dtype": dtype,
        "quantize": quantize,
        "quantization": quantization_entry(quantize, int4_block_size),
        "optimized": bool(optimization and optimization.get("kept") == "fused"),
        "optimization": optimization,
        "exporter": route,
        "versions": _optimum.versions(),
        "files": None,  # hashed once, by export(), when the folder is final
        "parity": None,
        "golden": None,  # golden.npz's entry once parity passed (export/golden.py)
    }
    if getattr(ref, "template", None) is not None:  # inline virtual slots: placeholders in input_ids (FORMAT.md)
        manifest["template"] = ref.describe(base_dir)
    return manifest


def _install(tmp: Path, output: Path) -> None:
    """Swap the finished folder into place. Files in an old ``output`` that we did not write are carried over."""
    owned = {mf.MANIFEST_NAME}
    if output.is_dir():
        try:
            owned.update(mf.read_manifest(output, verify=False).get("files", {}))
        except Exception:
            pass  # not an export of ours: everything in it is the user's and is kept
    swap_in(tmp, output, owned)
