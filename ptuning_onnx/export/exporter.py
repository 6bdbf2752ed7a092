"""``export()``: bake the prompt, trace the prefixed model to ONNX, write a self-describing folder, prove parity.

The folder is built in a temporary sibling and renamed into place only after parity passed, so a killed or
failed export never leaves anything that looks valid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import manifest as mf
from .._fs import check_target, recover_interrupted, swap_in, temp_beside
from ..adapter import Adapter, load_adapter
from ..config import TASK_TO_CLI, TaskType, parse_task
from ..errors import ConfigError, ExportError, ManifestError, ParityError
from ..reference import PTuningModel, apply_head_weights, head_modules, load_base
from ..reference_template import reference_for
from . import _optimum, graph_io
from .genai import write_genai_config
from .golden import write_golden
from .passes import DTYPES, QUANTIZE, apply_passes, check_options  # noqa: F401  (DTYPES, QUANTIZE re-exported)
from .optimize import quantization_entry
from .wrappers import CausalLMGraph, EncoderTaskGraph, GraphSpec, Seq2SeqDecoderGraph, Seq2SeqEncoderGraph



@dataclass
class ExportResult:
    path: Path
    manifest: dict
    report: Optional[dict]


class Progress:
    """One line per long step, with its duration; silent when ``enabled`` is False."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def step(self, message: str):
        return _Step(self, message)


class _Step:
    def __init__(self, progress: Progress, message: str):
        self.progress, self.message = progress, message

    def __enter__(self):
        self.start = time.perf_counter()
        if self.progress.enabled:
            print(f"[ptuning-onnx] {self.message} ...", file=sys.stderr, flush=True)
        return self

    def __exit__(self, exc_type, *_):
        if self.progress.enabled and exc_type is None:
            print(f"[ptuning-onnx] {self.message}: done in {time.perf_counter() - self.start:.1f}s",
                  file=sys.stderr, flush=True)


def load_reference(base_model: os.PathLike, adapter: os.PathLike | Adapter, task=None,
                   dtype: torch.dtype = torch.float32) -> PTuningModel:
    """Base + adapter -> baked ``PTuningModel``, with every mismatch reported before weights are loaded."""
    base_dir = Path(base_model)
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    task = parse_task(task or adapter.config.task_type or _missing_task())
    if not (base_dir / "config.json").is_file():
        raise ConfigError(f"base model folder {base_dir} has no config.json")
    try:
        config = mf.read_model_config(base_dir)
    except ManifestError as exc:
        raise ConfigError(f"base model: {exc}") from None
    hidden = next((config[k] for k in ("hidden_size", "n_embd", "d_model", "dim") if k in config), None)
    if hidden is not None and adapter.prompt_embeddings.shape[1] != hidden:
        raise ConfigError(f"adapter token_dim is {adapter.prompt_embeddings.shape[1]} but base model {base_dir} "
                          f"has hidden size {hidden}")
    base = load_base(base_dir, task, labels=adapter.labels, dtype=dtype)
    if adapter.labels is None and task in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS):
        # A PEFT adapter does not say how many labels its head has; its output layer's weights do. That layer is
        # the head parameter whose first dimension is the base config's label count but not the adapter's.
        params, count = base.state_dict(), base.config.num_labels
        wanted = {v.shape[0] for k, v in adapter.head_weights.items()
                  if k in params and params[k].shape[0] == count and v.shape[0] != count}
        if len(wanted) == 1:
            base = load_base(base_dir, task, labels=[f"LABEL_{i}" for i in range(wanted.pop())], dtype=dtype)
    if task in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS):
        # A fresh head the adapter does not carry would be random: refuse rather than export a random classifier.
        missing = [m for m in head_modules(base) if not any(k.startswith(m + ".") for k in adapter.head_weights)]
        if missing:
            raise ConfigError(f"base model {base_dir} has no trained weights for {', '.join(missing)} and the adapter "
                              f"carries none either; the {task.value} head would be random")
    apply_head_weights(base, adapter.head_weights)
    return reference_for(base, adapter.prompt().to(dtype), task, adapter.template).eval()


def _missing_task():
    raise ConfigError("the adapter config has no task_type; pass --task")


def export(base_model: os.PathLike, adapter: os.PathLike, output: os.PathLike, *, task=None, opset: int = 18,
           dtype: str = "fp32", device: str = "cpu", optimize: bool = False, quantize: Optional[str] = None,
           atol: Optional[float] = None, skip_verify: bool = False, overwrite: bool = False,
           progress: bool = True, exporter: str = "auto", external_data: Optional[bool] = None,
           int4_block_size: Optional[int] = None) -> ExportResult:
    """Export ``base_model`` + P-tuning ``adapter`` to an ONNX folder at ``output`` and verify parity.

    ``quantize``: None, ``"int8"`` (dynamic int8 MatMul) or ``"int4"`` (weight-only 4-bit MatMulNBits, one scale
    per ``int4_block_size`` weights: 16, 32 (None: the default), 64, 128 or 256).
    ``external_data``: weights in ``<graph>.onnx.data`` beside each graph; None (default) decides by size
    (graph_io.EXTERNAL_THRESHOLD: onnxruntime maps external weights; protobuf cannot hold more than 2 GiB).
    """
    from ..parity import ReferenceMemo, check_parity, default_atol, default_rtol

    output = _check_output(output, overwrite)
    check_options(dtype=dtype, device=device, quantize=quantize, external_data=external_data, opset=opset,
                  skip_verify=skip_verify, int4_block_size=int4_block_size)
    route = _resolve_route(exporter)
    log = Progress(progress)
    with log.step("loading base model and adapter"):
        adapter_dir = Path(adapter)
        loaded = load_adapter(adapter_dir)
        ref = load_reference(base_model, loaded, task)
    task = ref.task
    tmp = temp_beside(output)
    try:
        with log.step(f"exporting {TASK_TO_CLI[task]} graphs (opset {opset}, {route})"):
            graphs = _export_graphs(ref, tmp, opset, route, external_data)
        memo = ReferenceMemo()  # the exact gate, the quantized gate and golden.npz share the reference's outputs

        def exact_fp32(optimization):
            fp32 = _build_manifest(ref, tmp, graphs, Path(base_model), adapter_dir, loaded.config, opset, dtype,
                                   None, optimization, route)
            return _verified(lambda: check_parity(tmp, ref, fp32, atol=default_atol(), device=device, memo=memo),
                             output)

        optimization, exact = apply_passes(tmp, graphs, ref.base.config, task, log, optimize=optimize, dtype=dtype,
                                           quantize=quantize, external_data=external_data,
                                           exact_fp32=None if skip_verify else exact_fp32, ref=ref,
                                           int4_block_size=int4_block_size)
        _copy_side_files(Path(base_model), ref, tmp)
        manifest = _build_manifest(ref, tmp, graphs, Path(base_model), adapter_dir, loaded.config, opset, dtype,
                                   quantize, optimization, route, int4_block_size)
        # onnxruntime-genai's sidecar, hashed below like every other file. genai sizes each present as its own
        # count of tokens, so a graph whose cache also holds the prompt's positions (a fused Llama) gets none.
        # A templated graph needs placeholder ids that genai cannot make: without them it would run prefix-only.
        if (task == TaskType.CAUSAL_LM and not manifest["model"]["cache_holds_prompt"]
                and not manifest.get("template")):
            write_genai_config(tmp, manifest)
        report = None
        if not skip_verify:
            if quantize:
                from ..parity_quantized import REL_LIMIT, check_quantized

                with log.step(f"verifying the {quantize} graph against PyTorch (teacher-forced, error <= "
                              f"{REL_LIMIT:g} of the prompt's effect)"):
                    report = _verified(lambda: check_quantized(tmp, ref, manifest, device=device, exact=exact,
                                                            memo=memo), output)
                invariance = exact["padding_invariant"] if exact else {"passed": True, "max_abs_diff": {}}
            else:
                tolerance = atol if atol is not None else default_atol(dtype)
                rtol = default_rtol(dtype)
                bound = f"atol {tolerance:g}" + (f", rtol {rtol:g}" if rtol else "")
                with log.step(f"verifying parity against PyTorch ({bound})"):
                    report = _verified(lambda: check_parity(tmp, ref, manifest, atol=tolerance, rtol=rtol,
                                                            device=device, memo=memo), output)
                invariance = report["padding_invariant"]
            manifest["parity"] = report
            # The cases the gate compared, with the reference's outputs (from the memo, no new forward), for
            # checks on hosts without torch. Absent with --skip-verify: there are no reference outputs then.
            manifest["golden"] = write_golden(tmp, memo, manifest["task"], report)
            manifest["model"]["padding_invariant"] = invariance["passed"]
            if not invariance["passed"]:
                warnings.warn(f"{ref.base.config.model_type}: a padded row does not give what it gives alone "
                              f"(max diff {max(invariance['max_abs_diff'].values()):.3g}); the "
                              "runtime will refuse padded batches for this export", stacklevel=2)
        finalize(tmp, manifest, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(output, manifest, report)


def finalize(tmp: Path, manifest: dict, output: Path) -> None:
    """Hash every file once the folder is final (4.4 GB take ~8 s on a 1.1B model), write the manifest last (a
    folder without one never looks like a finished export), and swap the folder into place."""
    manifest["files"] = mf.hash_files(tmp, [p.name for p in tmp.iterdir()
                                            if p.is_file() and p.name != mf.MANIFEST_NAME])
    mf.write_manifest(tmp, manifest)
    _install(tmp, output)


def _verified(check, output: Path) -> dict:
    """Run a parity ``check``; on failure write ``<output>.parity-report.json`` and name it in the error."""
    try:
        return check()
    except ParityError as exc:
        failed = output.with_name(output.name + ".parity-report.json")
        if getattr(exc, "report", None) is not None:
            failed.write_text(json.dumps(exc.report, indent=2, sort_keys=True))
            exc.args = (f"{exc.args[0]} (report: {failed})",)
        raise


def _check_output(output: os.PathLike, overwrite: bool) -> Path:
    path = check_target(output)
    recover_interrupted(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {path} is not empty; pass --overwrite to replace an earlier export")
    return path


ROUTES = ("auto", "torchscript", "dynamo")


def _resolve_route(route: str) -> str:
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


def _export_graphs(ref: PTuningModel, folder: Path, opset: int, route: str,
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


def _copy_side_files(base_dir: Path, ref: PTuningModel, folder: Path) -> None:
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


def _build_manifest(ref: PTuningModel, folder: Path, specs, base_dir: Path, adapter_dir: Path, adapter_cfg,
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
