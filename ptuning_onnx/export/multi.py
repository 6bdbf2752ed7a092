"""Multi-prompt export: several P-tuning adapters of one base model in ONE set of graphs.

The graphs take one more input, ``prompt_ids`` (B,) int64, that picks each row's adapter, so the rows of one
batch can use different prompts. The prompts are stacked into tables padded to the longest, N virtual tokens:
adapter k's n_k real slots come first, its N - n_k pad slots after, and the pad slots are masked out of attention.
Positions are per row, so each row gives what that adapter's single export gives, its positions included: the
prompt at 0..n_k-1 and the row's first real token at n_k.

- causal-lm: each adapter's prompt keys/values are computed once here, as in the single export (wrappers.py),
  and stacked to (K, kv_heads, N, head_dim) per layer; the graph gathers a row's with ``prompt_ids``.
- feature-extraction, seq-cls and token-cls: the prompt tables (K, N, hidden) are gathered and prepended to the
  embeddings; seq-cls and token-cls then apply every adapter's own trained head and keep each row's
  (multi_heads.py), logits padded to the largest label count.
- seq2seq-lm: an encoder graph and a decoder graph, both taking ``prompt_ids`` (multi_seq2seq.py); each row's
  prompt fills the END of the N slots, so T5's relative positions see it as its single export does.

Every adapter must be for the same task and the same base model (its recorded base's config.json, where that
folder exists, must hash like the given base's); a mismatch is refused naming the adapter.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import manifest as mf
from .._fs import temp_beside
from ..adapter import load_adapter
from ..config import TASK_TO_CLI, TaskType, parse_task
from ..errors import ConfigError, ExportError, PtuningError
from ..reference import PTuningModel
from . import _optimum
from .exporter import ExportResult, Progress, load_reference
from .folder import build_manifest, check_output, copy_side_files, export_graphs, finalize, resolve_route, verified
from .passes import apply_passes, check_options
from .multi_seq2seq import MultiSeq2SeqDecoderGraph, MultiSeq2SeqEncoderGraph
from .prompt_tables import PROMPT_IDS, gather_prompts, padded, register_prompts
from .genai import write_genai_config
from .multi_heads import RowHeads, head_paths, label_info, with_modules
from .wrappers import (CausalLMGraph, EncoderTaskGraph, GraphSpec, causal_example, decode, dynamic_cache,
                       causal_spec)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MULTI_TASKS = (TaskType.CAUSAL_LM, TaskType.FEATURE_EXTRACTION, TaskType.SEQ_CLS, TaskType.TOKEN_CLS,
               TaskType.SEQ_2_SEQ_LM)
HEADED = (TaskType.SEQ_CLS, TaskType.TOKEN_CLS)


def parse_adapter_specs(specs: list) -> dict:
    """``["NAME=DIR", ...]`` -> ``{name: Path(DIR)}`` in the given order; names unique and plain."""
    out: dict = {}
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        if not sep or not path:
            raise ConfigError(f"--adapter {spec!r}: with several adapters each is NAME=DIR")
        if not ADAPTER_NAME.match(name):
            raise ConfigError(f"adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a "
                              "letter or digit")
        if name in out:
            raise ConfigError(f"adapter name {name!r} is given twice")
        out[name] = Path(path)
    if not out:
        raise ConfigError("no adapters given")
    return out


def load_references(base_model: os.PathLike, adapters: dict, task=None) -> tuple[dict, dict]:
    """-> ({name: baked PTuningModel}, {name: Adapter}); every reference shares ONE loaded base model."""
    base_dir = Path(base_model)
    loaded = {}
    for name, path in adapters.items():
        try:
            loaded[name] = load_adapter(path)
        except PtuningError as exc:
            raise ConfigError(f"adapter {name!r} ({path}): {exc}") from None
    templated = [name for name, adapter in loaded.items() if adapter.template is not None]
    if templated:
        raise ConfigError(f"adapter {templated[0]!r} has a template; templated adapters are exported one by one")
    tasks = {}
    for name, adapter in loaded.items():
        wanted = task or adapter.config.task_type
        if not wanted:
            raise ConfigError(f"adapter {name!r} has no task_type in its config; pass --task")
        tasks[name] = parse_task(wanted)
    first = next(iter(loaded))
    for name, found in tasks.items():
        if found != tasks[first]:
            raise ConfigError(f"adapter {name!r} is for task {TASK_TO_CLI[found]} but {first!r} is for "
                              f"{TASK_TO_CLI[tasks[first]]}; one multi-prompt export holds one task")
    if tasks[first] not in MULTI_TASKS:
        raise ConfigError(f"several adapters in one export: supported for "
                          f"{', '.join(TASK_TO_CLI[t] for t in MULTI_TASKS)}, not {TASK_TO_CLI[tasks[first]]} "
                          "; export them one by one")
    if not (base_dir / "config.json").is_file():
        raise ConfigError(f"base model folder {base_dir} has no config.json")
    base_sha = mf.sha256_file(base_dir / "config.json")
    for name, adapter in loaded.items():
        recorded = adapter.config.base_model_name_or_path
        config = Path(recorded) / "config.json" if recorded else None
        if config is not None and config.is_file() and mf.sha256_file(config) != base_sha:
            raise ConfigError(f"adapter {name!r} was trained on {recorded}, whose config.json differs from "
                              f"--base-model {base_dir}'s (sha256 {mf.sha256_file(config)[:12]}... != "
                              f"{base_sha[:12]}...); every adapter must share the base model")
    refs = {first: _named(first, load_reference, base_dir, loaded[first], tasks[first])}
    base = refs[first].base
    width = int(refs[first].table.shape[1])
    heads = head_paths(base, list(loaded.values()))
    for name, adapter in loaded.items():
        if name == first:
            continue
        if adapter.prompt_embeddings.shape[1] != width:
            raise ConfigError(f"adapter {name!r} has token_dim {adapter.prompt_embeddings.shape[1]} but the base "
                              f"model's hidden size is {width}; every adapter must share the base model")
        own = base
        if tasks[first] in HEADED:
            # Its own head (labels read from the adapter, as a single export does), grafted onto the shared body.
            alone = _named(name, load_reference, base_dir, adapter, tasks[first]).base
            own = with_modules(base, {path: alone.get_submodule(path) for path in heads}, config=alone.config)
            # The grafted model must BE the adapter's single reference, weight for weight: parity compares against
            # it, so a head left shared would pass unseen.
            mine, theirs = own.state_dict(), alone.state_dict()
            differ = [k for k, v in theirs.items() if k not in mine or mine[k].shape != v.shape
                      or not torch.equal(mine[k], v)]
            if differ:
                raise ExportError(f"adapter {name!r}: on the shared body it differs from its own reference in "
                                  f"{', '.join(differ[:4])}; its head modules were not all found")
        refs[name] = PTuningModel(own, adapter.prompt().to(base.dtype), tasks[first]).eval()
    lengths = {name: ref.n for name, ref in refs.items()}
    # Relative positions (T5's buckets) are kept by seq2seq's real-last slots (multi_seq2seq.py): any lengths work.
    relative = tasks[first] == TaskType.SEQ_2_SEQ_LM and hasattr(base.config, "relative_attention_num_buckets")
    if len(set(lengths.values())) > 1 and not refs[first]._takes_positions and not relative:
        raise ConfigError(f"'{base.config.model_type}' takes no explicit positions, so prompts of different lengths "
                          f"({lengths}) cannot share a graph exactly; give every adapter the same num_virtual_tokens")
    return refs, loaded


def _named(name: str, load, *args):
    """``load(*args)``, its ConfigError naming the adapter it was about."""
    try:
        return load(*args)
    except ConfigError as exc:
        raise ConfigError(f"adapter {name!r}: {exc}") from None


class MultiCausalLMGraph(nn.Module):
    """Decoder with past; K prompts' keys/values as constants, one picked per row by ``prompt_ids``.

    Inputs: input_ids (B, S); attention_mask (B, P+S); position_ids (B, S); prompt_ids (B,) in [0, K);
        past_key_values.{i}.key|value (B, KV, P, Dh); logits_to_keep () default 0 = all.
    Outputs: logits (B, S or k, V); present.{i}.key|value (B, KV, P+S, Dh) (user positions only).
    """

    def __init__(self, refs: list):
        super().__init__()
        singles = [CausalLMGraph(ref) for ref in refs]  # each computes its prompt's keys/values, as a single export
        first = singles[0]
        self.model, self.num_layers = first.model, first.num_layers
        self.kv_heads, self.head_dim = first.kv_heads, first.head_dim
        self.takes_positions, self._keep_native = first.takes_positions, first._keep_native
        self.n = max(s.n for s in singles)  # N: the graph's prompt slots
        for i in range(self.num_layers):
            for kind in ("key", "value"):
                table = padded([getattr(s, f"prompt_{kind}_{i}")[0] for s in singles], self.n, 1)
                self.register_buffer(f"prompt_{kind}_{i}", table)  # (K, KV, N, Dh)
        self.register_buffer("prompt_mask", padded([torch.ones(s.n, dtype=torch.long) for s in singles], self.n, 0))
        # User position p of a row of adapter k sits at model position n_k + offset + p, as in its single export.
        self.register_buffer("prompt_offset", torch.tensor([s.offset for s in singles], dtype=torch.long))

    def spec(self) -> GraphSpec:
        return causal_spec(self.num_layers, (PROMPT_IDS,))

    def example(self, batch=2, seq=3, past=4):
        return causal_example(self, batch, seq, past, (torch.arange(batch) % self.prompt_mask.shape[0],))

    def forward(self, input_ids, attention_mask, position_ids, prompt_ids, past, logits_to_keep):
        cache = []
        for i in range(self.num_layers):
            key = getattr(self, f"prompt_key_{i}").index_select(0, prompt_ids)  # (B, KV, N, Dh)
            value = getattr(self, f"prompt_value_{i}").index_select(0, prompt_ids)
            cache.append((torch.cat([key, past[2 * i]], 2), torch.cat([value, past[2 * i + 1]], 2)))
        prompt_mask = self.prompt_mask.index_select(0, prompt_ids).to(attention_mask.dtype)  # (B, N)
        mask = torch.cat([prompt_mask, attention_mask], 1)
        kwargs = dict(input_ids=input_ids, attention_mask=mask, past_key_values=dynamic_cache(cache), use_cache=True)
        if self.takes_positions:
            kwargs["position_ids"] = position_ids + self.prompt_offset.index_select(0, prompt_ids).unsqueeze(1)
        # self.n: the N prompt slots (padded table), the graph's own
        return decode(self.model, kwargs, input_ids, logits_to_keep, self._keep_native, self.n)


class MultiEncoderGraph(nn.Module):
    """feature-extraction, seq-cls, token-cls with K prompt tables, one picked per row by ``prompt_ids``.

    Inputs: input_ids (B, S), attention_mask (B, S) [, token_type_ids (B, S)], prompt_ids (B,).
    Output: last_hidden_state (B, S, D) | logits (B, L) | logits (B, S, L), user positions only; L is the largest
    label count, each row's adapter's labels first and ``LABEL_PAD`` after (multi_heads.py).
    """

    def __init__(self, refs: list, extra_inputs: list):
        super().__init__()
        first = refs[0]
        self.base, self.extra = first.base, list(extra_inputs)
        self.output = EncoderTaskGraph.OUTPUT[first.task.value]
        # seq-cls, token-cls: the body once, then every adapter's head, each row keeping its own (multi_heads.py).
        self.row_heads = RowHeads(refs) if first.task in HEADED else None
        self.task_ref = self.row_heads.ref if self.row_heads else first
        self.takes_positions, self.offset = first._takes_positions, first.position_offset
        self.n = register_prompts(self, refs)  # tables (K, N, D), prompt_mask (K, N), prompt_n (K,)

    def spec(self) -> GraphSpec:
        names = ["input_ids", "attention_mask", *self.extra, PROMPT_IDS]
        axes = {name: {0: "batch", 1: "sequence"} for name in names}
        axes[PROMPT_IDS] = {0: "batch"}
        axes[self.output] = {0: "batch"} if self.task_ref.task == TaskType.SEQ_CLS else {0: "batch", 1: "sequence"}
        return GraphSpec("model", names, [self.output], axes)

    def example(self, batch=2, seq=5):
        vocab = self.base.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
        return (ids, torch.ones_like(ids), *[torch.zeros_like(ids) for _ in self.extra],
                torch.arange(batch) % self.prompt_mask.shape[0])

    def forward(self, input_ids, attention_mask, third, fourth=None):
        # (token_type_ids, prompt_ids) or (prompt_ids,): named parameters, not *args, which torch.export packs into
        # one tuple that the dynamo route's dynamic shapes cannot name.
        token_type_ids, prompt_ids = (third, fourth) if self.extra else (None, third)
        embeds = self.base.get_input_embeddings()(input_ids)
        prompts, prompt_mask = gather_prompts(self, prompt_ids, attention_mask.dtype, embeds.dtype)  # (B, N, D)
        kwargs = {"inputs_embeds": torch.cat([prompts, embeds], 1),
                  "attention_mask": torch.cat([prompt_mask, attention_mask], 1)}
        if self.takes_positions:
            # As PTuningModel.extend_inputs, per row: slots at 0..N-1 (a row's real ones at 0..n_k-1, the rest
            # masked), its user tokens at n_k + index among its real tokens.
            slots = (torch.cumsum(torch.ones_like(prompt_mask), -1) - 1)
            user = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            user = user + self.prompt_n.index_select(0, prompt_ids).unsqueeze(1)
            kwargs["position_ids"] = torch.cat([slots, user], 1) + self.offset
        if token_type_ids is not None:
            kwargs["token_type_ids"] = torch.cat([torch.zeros_like(prompt_mask).to(token_type_ids.dtype),
                                                  token_type_ids], 1)
        if self.row_heads is None:
            return self.task_ref.task_forward(kwargs, self.n)[self.output]
        with self.row_heads.select(prompt_ids):
            return self.task_ref.task_forward(kwargs, self.n)[self.output]


def export_multi(base_model: os.PathLike, adapters: dict, output: os.PathLike, *, task=None, opset: int = 18,
                 dtype: str = "fp32", device: str = "cpu", optimize: bool = False, quantize: Optional[str] = None,
                 atol: Optional[float] = None, skip_verify: bool = False, overwrite: bool = False,
                 progress: bool = True, exporter: str = "auto", external_data: Optional[bool] = None,
                 int4_block_size: Optional[int] = None) -> ExportResult:
    """Export ``{name: adapter_dir}`` over ``base_model`` as ONE multi-prompt folder at ``output``.

    ``dtype``, ``optimize``, ``quantize``: the single export's passes (passes.py), in the same order. Parity: each
    adapter's rows of a mixed, padded batch against that adapter alone (parity_multi.py), by the dtype's rule;
    quantized graphs: first the fp32 graph exactly, then the quantized gate per adapter. Parity runs on the CPU
    (``device="cuda"`` is refused: check the folder on a GPU host with ``ptuning-verify --provider cuda``).
    """
    from ..parity_multi import check_multi, check_quantized_multi
    from ..tolerance import default_atol, default_rtol
    from .golden import write_golden

    output = check_output(output, overwrite)
    check_options(dtype=dtype, device=device, quantize=quantize, external_data=external_data, opset=opset,
                  skip_verify=skip_verify, int4_block_size=int4_block_size)
    if device != "cpu" and not skip_verify:
        raise ConfigError(f"--device {device}: a multi-prompt export's parity runs on the CPU; check the folder on a "
                          "GPU host with ptuning-verify --provider cuda (its golden.npz holds every adapter's rows)")
    if not adapters:
        raise ConfigError("no adapters given")
    route = resolve_route(exporter)
    log = Progress(progress)
    with log.step(f"loading base model and {len(adapters)} adapters"):
        refs, loaded = load_references(base_model, adapters, task)
    names = list(refs)
    ordered = [refs[name] for name in names]
    first = ordered[0]
    if first.task == TaskType.CAUSAL_LM:
        def make():
            return [MultiCausalLMGraph(ordered)]
    elif first.task == TaskType.SEQ_2_SEQ_LM:
        def make():
            return [MultiSeq2SeqEncoderGraph(ordered), MultiSeq2SeqDecoderGraph(ordered)]
    else:
        def make():
            return [MultiEncoderGraph(ordered, _optimum.extra_inputs(first.base, first.task))]

    def manifest_for(graph_dtype, graph_quantize, optimization) -> dict:
        manifest = build_manifest(first, tmp, graphs, Path(base_model), Path(adapters[names[0]]),
                                   loaded[names[0]].config, opset, graph_dtype, graph_quantize, optimization, route,
                                   int4_block_size)
        _describe(manifest, refs, loaded, adapters)
        return manifest

    tmp = temp_beside(output)
    try:
        with log.step(f"exporting one {TASK_TO_CLI[first.task]} graph for {len(names)} prompts (opset {opset}, "
                      f"{route})"):
            graphs = export_graphs(first, tmp, opset, route, external_data, make_wrappers=make)

        def exact_fp32(optimization):
            fp32 = manifest_for("fp32", None, optimization)
            return verified(lambda: check_multi(tmp, refs, fp32, atol=default_atol()), output)

        optimization, exact = apply_passes(tmp, graphs, first.base.config, first.task, log, optimize=optimize,
                                           dtype=dtype, quantize=quantize, external_data=external_data,
                                           exact_fp32=None if skip_verify else exact_fp32,
                                           raw_attention_mask=True,  # shorter prompts leave masked slots
                                           int4_block_size=int4_block_size,
                                           ref=ordered if first.task == TaskType.CAUSAL_LM else None)
        copy_side_files(Path(base_model), first, tmp)
        if first.task in HEADED:  # config.json describes the graph's padded logits; the labels are per adapter
            width = max(label_info(ref)["num_labels"] for ref in ordered)
            config = copy.deepcopy(first.base.config)
            config.id2label = {i: f"LABEL_{i}" for i in range(width)}
            config.label2id = {f"LABEL_{i}": i for i in range(width)}
            config.save_pretrained(tmp)
        manifest = manifest_for(dtype, quantize, optimization)
        # genai feeds prompt_ids with generator.set_model_input (FORMAT.md); it sizes each present to its own
        # tokens, so a fused graph whose cache holds the prompt's slots gets no genai_config.json.
        if first.task == TaskType.CAUSAL_LM and not manifest["model"]["cache_holds_prompt"]:
            write_genai_config(tmp, manifest)
        report = None
        if not skip_verify:
            if quantize:
                with log.step(f"verifying the {quantize} graph per adapter (teacher-forced, error relative to each "
                              "prompt's effect)"):
                    report, memo = verified(lambda: check_quantized_multi(tmp, refs, manifest, exact=exact), output)
                manifest["golden"] = write_golden(tmp, memo, manifest["task"], report, adapters=len(names))
            else:
                tolerance, rtol = (default_atol(dtype) if atol is None else atol), default_rtol(dtype)
                arrays: dict = {}
                with log.step(f"verifying each adapter's rows in a mixed, padded batch against that adapter alone "
                              f"(atol {tolerance:g}" + (f", rtol {rtol:g})" if rtol else ")")):
                    report = verified(lambda: check_multi(tmp, refs, manifest, atol=tolerance, rtol=rtol,
                                                           golden=arrays), output)
                manifest["golden"] = _write_golden(tmp, arrays, report)
            manifest["parity"] = report
            manifest["model"]["padding_invariant"] = True  # the check compares padded rows with rows alone
        finalize(tmp, manifest, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(output, manifest, report)


def _describe(manifest: dict, refs: dict, loaded: dict, paths: dict) -> None:
    """The manifest of a multi-prompt folder: ``adapters`` {name: id, ...}; lengths count the longest prompt."""
    n = max(ref.n for ref in refs.values())
    manifest["num_virtual_tokens"] = n  # the graph's prompt slots (N); each adapter's own n is under adapters
    limit = manifest["model"]["max_user_tokens"]
    first = next(iter(refs.values()))
    if limit is not None:  # limit - n_first, from build_manifest; the longest prompt leaves the least room
        manifest["model"]["max_user_tokens"] = limit + first.n - n
    manifest["adapter"] = None
    manifest["adapter_config"] = None
    manifest["prompt_input"] = PROMPT_IDS
    manifest["adapters"] = {
        name: {"id": index, "num_virtual_tokens": refs[name].n, "path": str(Path(paths[name]).resolve()),
               "adapter_config": loaded[name].config.to_dict()}
        for index, name in enumerate(refs)}
    if first.task in HEADED:  # each adapter's own head: its label count and names; the graph pads to the largest
        for name, ref in refs.items():
            manifest["adapters"][name].update(label_info(ref))
        manifest["model"]["id2label"] = None
    manifest.setdefault("golden", None)  # golden.npz's entry once parity passed


def _write_golden(folder: Path, arrays: dict, report: dict) -> dict:
    """golden.npz of a multi-prompt folder: parity's mixed batch (``case0.*``, with ``case0.prompt_ids``) and greedy
    steps (``greedy.*``, with ``greedy.prompt_ids``); runtime/golden.py checks it like a single folder's."""
    import numpy as np

    from .golden import GOLDEN_FORMAT, keep_columns

    keep_columns(arrays)
    np.savez(folder / mf.GOLDEN_NAME, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    # scales: each output's largest |reference| on real values, as parity measured it (the arrays hold LABEL_PAD
    # in padded label columns, and large vocabularies keep a column subset), for fp16's relative bound.
    return {"file": mf.GOLDEN_NAME, "format_version": GOLDEN_FORMAT, "cases": 1, "gate": "exact",
            "greedy_steps": report.get("greedy_steps"), "atol": report["atol"], "rtol": report.get("rtol", 0.0),
            "scales": report.get("scales"),
            "logits_columns": int(arrays["logits.columns"].size) if "logits.columns" in arrays else None}
