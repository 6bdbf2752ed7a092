"""``export()``: bake the prompt, trace the prefixed model to ONNX, write a self-describing folder, prove parity.

The folder is built in a temporary sibling and renamed into place only after parity passed, so a killed or
failed export never leaves anything that looks valid.
"""

from __future__ import annotations

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
from .._fs import temp_beside
from ..adapter import Adapter, load_adapter
from ..config import TASK_TO_CLI, TaskType, parse_task
from ..errors import ConfigError, ManifestError
from ..reference import PTuningModel, apply_head_weights, head_modules, load_base
from ..reference_template import reference_for
from .folder import build_manifest, check_output, copy_side_files, export_graphs, finalize, resolve_route, verified
from .genai import write_genai_config
from .golden import write_golden
from .passes import DTYPES, QUANTIZE, apply_passes, check_options  # noqa: F401  (DTYPES, QUANTIZE re-exported)



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

    output = check_output(output, overwrite)
    check_options(dtype=dtype, device=device, quantize=quantize, external_data=external_data, opset=opset,
                  skip_verify=skip_verify, int4_block_size=int4_block_size)
    route = resolve_route(exporter)
    log = Progress(progress)
    with log.step("loading base model and adapter"):
        adapter_dir = Path(adapter)
        loaded = load_adapter(adapter_dir)
        ref = load_reference(base_model, loaded, task)
    task = ref.task
    tmp = temp_beside(output)
    try:
        with log.step(f"exporting {TASK_TO_CLI[task]} graphs (opset {opset}, {route})"):
            graphs = export_graphs(ref, tmp, opset, route, external_data)
        memo = ReferenceMemo()  # the exact gate, the quantized gate and golden.npz share the reference's outputs

        def exact_fp32(optimization):
            fp32 = build_manifest(ref, tmp, graphs, Path(base_model), adapter_dir, loaded.config, opset, dtype,
                                   None, optimization, route)
            return verified(lambda: check_parity(tmp, ref, fp32, atol=default_atol(), device=device, memo=memo),
                             output)

        optimization, exact = apply_passes(tmp, graphs, ref.base.config, task, log, optimize=optimize, dtype=dtype,
                                           quantize=quantize, external_data=external_data,
                                           exact_fp32=None if skip_verify else exact_fp32, ref=ref,
                                           int4_block_size=int4_block_size)
        copy_side_files(Path(base_model), ref, tmp)
        manifest = build_manifest(ref, tmp, graphs, Path(base_model), adapter_dir, loaded.config, opset, dtype,
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
                    report = verified(lambda: check_quantized(tmp, ref, manifest, device=device, exact=exact,
                                                            memo=memo), output)
                invariance = exact["padding_invariant"] if exact else {"passed": True, "max_abs_diff": {}}
            else:
                tolerance = atol if atol is not None else default_atol(dtype)
                rtol = default_rtol(dtype)
                bound = f"atol {tolerance:g}" + (f", rtol {rtol:g}" if rtol else "")
                with log.step(f"verifying parity against PyTorch ({bound})"):
                    report = verified(lambda: check_parity(tmp, ref, manifest, atol=tolerance, rtol=rtol,
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
