"""``--optimize``: onnxruntime's transformer fusions, kept only where they measure faster.

onnxruntime's optimizer (``onnxruntime.transformers.optimizer``) rewrites known subgraphs into contrib ops that
exist on the CPU and the CUDA provider alike: LayerNormalization / SkipLayerNormalization and their RMS forms
(SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization), Gelu / FastGelu, RotaryEmbedding, and attention
where its pattern matches. Whether the fused graph runs faster depends on the model family (onnxruntime already
fuses some of the same patterns when it loads a session), so each export measures both on the task's own workload,
interleaved, and keeps the faster; the decision and the figures go in the manifest under ``optimization``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ExportError
from . import graph_io

# model_type -> the optimizer's recipe. Decoders of the Llama family share GPT-2's recipe (it holds the rotary and
# RMS-norm fusions); families not listed are exported unfused.
RECIPES = {
    "gpt2": "gpt2", "llama": "gpt2", "mistral": "gpt2", "qwen2": "gpt2", "qwen3": "gpt2", "phi3": "gpt2",
    "opt": "gpt2", "gpt_neox": "gpt_neox", "bert": "bert", "roberta": "bert", "distilbert": "bert",
    "xlm-roberta": "bert", "t5": "t5", "bart": "bart",
}
REPEATS = 5
# Above this much weight the built Llama graph is kept without timing it against the trace: it was the faster on
# every model measured (tiny to 125M, and 1.1B: 30.6 vs 24 tokens/s in int4), and two sessions of a 1B model
# beside the PyTorch reference took the export's peak to 4.2x the fp32 weights (18.3 GB for 4.4 GB).
UNTIMED_BYTES = 1 << 30


def fuse(folder: Path, graphs: list, config, task, *, external_data: Optional[bool] = None, ref=None,
         raw_attention_mask: bool = False) -> dict:
    """Fuse each graph in ``folder`` (names in ``graphs``), time fused against unfused, keep the faster.

    A Llama-family causal LM (``ref`` given: the reference, or a multi-prompt graph's list of them) is fused by
    writing its graph anew (build_llama.py) instead of by onnxruntime's pattern matching, which finds little in a
    traced decoder. ``raw_attention_mask``: fused attention
    keeps the 2-D mask. The BERT recipe otherwise turns it into one end index per row, which assumes every masked
    position comes after the real ones: true of a right-padded single export, false of a multi-prompt graph, whose
    shorter prompts leave masked slots BEFORE the user's tokens (measured: 4.8e-3 off on the tiny BERT). Returns the
    manifest's ``optimization`` entry."""
    from ..config import TaskType

    model_type = getattr(config, "model_type", None)
    why_not = None
    if ref is not None and task == TaskType.CAUSAL_LM and graphs == ["model"]:
        from . import build_llama

        why_not = build_llama.unsupported(config)
        if why_not is None:
            entry = _keep_faster(folder, graphs, config, task, external_data, "ptuning-onnx llama builder",
                                 lambda path, candidate: _build(build_llama, ref, path, candidate, external_data),
                                 untimed_above=UNTIMED_BYTES)
            entry["cache_holds_prompt"] = entry["kept"] == "fused"  # the built graph's cache convention
            if entry["kept"] == "fused":
                entry["min_onnxruntime"] = build_llama.MIN_ONNXRUNTIME
            return entry
    recipe = RECIPES.get(model_type)
    if recipe is None:
        return {"kept": "unfused", "reason": f"no fusion recipe for model type {model_type!r}"}
    heads = next((getattr(config, k) for k in ("num_attention_heads", "n_head", "num_heads") if getattr(config, k, 0)), 0)
    hidden = next((getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if getattr(config, k, 0)), 0)
    entry = _keep_faster(folder, graphs, config, task, external_data, recipe,
                         lambda path, candidate: _fuse_one(path, candidate, recipe, heads, hidden, external_data,
                                                           raw_attention_mask))
    if why_not:
        entry["builder"] = f"not built: {why_not}"
    return entry


def _build(build_llama, ref, path: Path, candidate: Path, external_data) -> dict:
    try:
        return build_llama.build(ref, candidate, opset=_opset(path), external_data=_external(path, external_data))
    except (KeyError, ValueError) as exc:  # a checkpoint laid out otherwise than the family's (a missing weight)
        first = ref[0] if isinstance(ref, (list, tuple)) else ref  # a multi-prompt graph's references
        raise ExportError(f"building the fused {first.base.config.model_type} graph failed: {type(exc).__name__}: "
                          f"{exc}; export without --optimize") from exc


def _opset(path: Path) -> int:
    return next(o.version for o in graph_io.load(path, data=False).opset_import if o.domain in ("", "ai.onnx"))


def _external(path: Path, external_data: Optional[bool]) -> Optional[bool]:
    return external_data if external_data is not None else graph_io.is_external(path) or None


def _keep_faster(folder: Path, graphs: list, config, task, external_data, recipe: str, make,
                 untimed_above: Optional[int] = None) -> dict:
    """``make(path, candidate)`` writes each graph's fused candidate and returns its fused-op counts; both are
    timed on the task's workload and the faster is kept. Node counts (top level) go in the entry too.

    ``untimed_above``: graphs with more weight bytes than this keep the candidate untimed (``ms`` null, ``reason``
    says so)."""
    fused_ops, candidates, nodes = {}, {}, {}
    for name in graphs:
        path = folder / f"{name}.onnx"
        candidate = folder / f"{name}.fused.onnx"
        fused_ops[name] = make(path, candidate)
        candidates[name] = candidate
        nodes[name] = {kind: len(graph_io.load(p, data=False).graph.node)
                       for kind, p in (("unfused", path), ("fused", candidate))}
    entry = {"recipe": recipe, "fused_ops": fused_ops, "nodes": nodes, "provider": "cpu",
             "workload": WORKLOAD_TEXT.get(task.value, "")}
    weight = 0 if untimed_above is None else sum(
        graph_io.tensor_bytes(graph_io.load(folder / f"{name}.onnx", data=False), folder) for name in graphs)
    if untimed_above is not None and weight > untimed_above:
        for name, candidate in candidates.items():
            graph_io.move(candidate, folder / f"{name}.onnx")
        return {**entry, "kept": "fused", "ms": None,
                "reason": f"not timed: {weight / 2**30:.1f} GiB of weights (two sessions beside the reference would "
                          "double the export's memory); the fused graph was the faster on every model measured"}
    try:
        try:
            unfused_ms, fused_ms = _time_both(folder, graphs, candidates, task, config)
        except Exception as exc:  # a fused op the CPU provider has no kernel for (T5's RelativePositionBias)
            if "NOT_IMPLEMENTED" not in str(exc):
                raise
            detail = str(exc).split("NOT_IMPLEMENTED :", 1)[-1].strip()
            return {**entry, "kept": "unfused", "ms": None,
                    "reason": f"the fused graph does not run on the CPU provider: {detail}"}
        keep = fused_ms < unfused_ms
        for name, candidate in candidates.items():
            if keep:
                graph_io.move(candidate, folder / f"{name}.onnx")
    finally:
        for candidate in candidates.values():
            for leftover in (candidate, candidate.parent / graph_io.data_name(candidate)):
                if leftover.exists():
                    leftover.unlink()
    return {**entry, "kept": "fused" if keep else "unfused",
            "ms": {"unfused": round(unfused_ms, 3), "fused": round(fused_ms, 3)}}


def _fuse_one(path: Path, candidate: Path, recipe: str, heads: int, hidden: int, external_data,
              raw_attention_mask: bool = False) -> dict:
    import logging

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(recipe)
    if raw_attention_mask:
        options.use_raw_attention_mask(True)

    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        # opt_level 0: the Python fusions only; onnxruntime's own graph passes run when a session loads it.
        model = optimize_model(str(path), model_type=recipe, num_heads=heads, hidden_size=hidden, opt_level=0,
                               optimization_options=options)
    except Exception as exc:
        raise ExportError(f"onnxruntime's {recipe} fusions failed on {path.name}: {type(exc).__name__}: {exc}") from exc
    finally:
        quiet.setLevel(level)
    before = {i.name for i in graph_io.load(path, data=False).graph.input}
    after = {i.name for i in model.model.graph.input}
    if before - after:
        raise ExportError(f"fusing {path.name} removed graph inputs {sorted(before - after)}")
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    graph_io.save(model.model, candidate, external=_external(path, external_data))
    return stats


WORKLOAD_TEXT = {
    "CAUSAL_LM": "batch 1, 32 tokens, then 16 decoding steps",
    "SEQ_2_SEQ_LM": "batch 1, 32 tokens, then 16 decoding steps",
    "SEQ_CLS": "batch 4 x 32 tokens", "TOKEN_CLS": "batch 4 x 32 tokens", "FEATURE_EXTRACTION": "batch 4 x 32 tokens",
}


def _time_both(folder: Path, graphs: list, candidates: dict, task, config) -> tuple[float, float]:
    """Median milliseconds of the task's workload on the unfused and the fused graphs, interleaved."""
    from ..config import TaskType
    from ..parity_onnx import Graphs, greedy_onnx, run_case

    vocab = int(config.vocab_size)
    manifests = []
    for files in ({g: f"{g}.onnx" for g in graphs}, {g: candidates[g].name for g in graphs}):
        manifests.append({"graphs": {g: {"file": f} for g, f in files.items()}, "dtype": "fp32",
                          "model": {"decoder_start_token_id": getattr(config, "decoder_start_token_id", None)}})
    sessions = [Graphs(folder, m, "cpu") for m in manifests]
    rng = np.random.default_rng(0)
    generating = task in (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM)
    ids = rng.integers(0, vocab, size=(1, 32) if generating else (4, 32), dtype=np.int64)
    mask = np.ones_like(ids)

    def once(which: int) -> float:
        start = time.perf_counter()
        if generating:
            greedy_onnx(sessions[which], manifests[which], task, ids, mask, 16)
        else:
            run_case(sessions[which], task, ids, mask)
        return (time.perf_counter() - start) * 1e3

    once(0), once(1)  # warm-up: first runs allocate
    times: list[list[float]] = [[], []]
    for i in range(REPEATS):
        for which in (i % 2, 1 - i % 2):
            times[which].append(once(which))
    sessions.clear()  # free the sessions before the graphs are moved
    return statistics.median(times[0]), statistics.median(times[1])

