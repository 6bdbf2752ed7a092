"""``golden.npz``: the parity gate's inputs and the PyTorch reference's outputs, saved in the exported folder so that
a host without torch can check the graphs again (``ptuning_onnx/runtime/golden.py``, ``ptuning-verify``).

Written from the ``ReferenceMemo`` the gates filled during the export: it holds exactly the cases they compared,
and costs no reference forward of its own. Arrays only, written by ``np.savez`` (no pickle); read it with
``np.load(path, allow_pickle=False)``. docs/FORMAT.md lists the arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from .. import manifest as mf
from ..tolerance import REL_LIMIT

if TYPE_CHECKING:
    from ..parity import ReferenceMemo

GOLDEN_FORMAT = 1
# Logits over a large vocabulary are kept on a column subset: every position's top reference tokens plus a seeded
# random sample. All of GPT-2-small's would be 47 MB per export (50257 columns x 212 compared positions); the subset
# is ~2 MB and still sees a wrong prompt, position or dtype, which moves every column.
FULL_VOCAB_UP_TO = 4096
RANDOM_COLUMNS, TOP_COLUMNS = 1024, 4


def write_golden(folder: Path, memo: "ReferenceMemo", task: str, report: dict,
                 adapters: Optional[int] = None) -> Optional[dict]:
    """Write ``folder/golden.npz``; return the manifest's ``golden`` entry (None when the memo is empty).

    ``task``: the CLI task name (``causal-lm``, ...). ``report``: the gate's report, for its tolerance. The exact
    gate's golden has every case it compared; the quantized gate's has the cases it compared (those with a
    perturbed-prompt control), with the control's outputs, so that the relative error can be computed again.
    ``adapters``: K for a multi-prompt folder whose memo stacks the K adapters' rows along the batch, in id order
    (parity_multi.check_quantized_multi); each case then gets ``prompt_ids``.
    """
    quantized = report.get("gate") == "quantized"
    cases = []
    for arrays, want in memo.entries("reference", "case"):
        control = memo.lookup("control", "case", arrays)
        if quantized and control is None:
            continue  # compared by the fp32 graph's exact gate only; the quantized graph is not held to it
        cases.append((arrays, want, control))
    if not cases:
        return None
    out: dict = {}
    for i, (arrays, want, control) in enumerate(cases):
        out[f"case{i}.input_ids"], out[f"case{i}.attention_mask"] = arrays[0], arrays[1]
        if adapters:
            out[f"case{i}.prompt_ids"] = _stacked_ids(adapters, len(arrays[0]))
        if task == "seq2seq-lm":
            out[f"case{i}.decoder_input_ids"] = arrays[2]
        # (token_type_ids, for models that have them, are zeros: the runtime makes them.) The KV cache ("present")
        # is left out: the greedy steps below read it back at every step.
        for role, outputs in (("reference", want), ("control", control)):
            for name, value in (outputs or {}).items():
                if name != "present":
                    out[f"case{i}.{role}.{name}"] = np.asarray(value, np.float32)
    greedy = memo.entries("reference", "greedy")
    steps = None
    if greedy:
        (ids, mask), (tokens, logits) = greedy[0]
        out.update({"greedy.input_ids": ids, "greedy.attention_mask": mask, "greedy.tokens": tokens,
                    "greedy.reference.logits": np.asarray(logits, np.float32)})
        if adapters:
            out["greedy.prompt_ids"] = _stacked_ids(adapters, len(ids))
        forced = memo.lookup("control", "forced", [ids, mask, tokens])
        if quantized and forced is not None:
            out["greedy.control.logits"] = np.asarray(forced, np.float32)
        steps = int(tokens.shape[1])
    scales = _logit_scales(out)  # measured before any column subset: the export's bound used the whole vocabulary
    keep_columns(out)
    for name, value in out.items():
        if value.dtype == object:  # np.savez would pickle it
            raise TypeError(f"golden array {name} has dtype object")
    np.savez(folder / mf.GOLDEN_NAME, **{k: np.ascontiguousarray(v) for k, v in out.items()})
    entry = {"file": mf.GOLDEN_NAME, "format_version": GOLDEN_FORMAT, "cases": len(cases), "greedy_steps": steps,
             "gate": "quantized" if quantized else "exact",
             "logits_columns": int(out["logits.columns"].size) if "logits.columns" in out else None}
    if quantized:
        entry["rel_limit"] = report.get("rel_limit", REL_LIMIT)
    else:
        entry.update(atol=report["atol"], rtol=report.get("rtol", 0.0))
        if "logits.columns" in out:
            entry["scales"] = scales
    return entry


def _stacked_ids(adapters: int, rows: int) -> np.ndarray:
    """(rows,) int64: K equal blocks of rows, adapter 0's first."""
    return np.repeat(np.arange(adapters, dtype=np.int64), rows // adapters)


def _logit_scales(out: dict) -> dict:
    """Largest |reference| per compared output name (``logits``; decoding steps: ``greedy_logits``)."""
    scales: dict = {}
    for key, value in out.items():
        if ".reference." in key and key.endswith(".logits"):
            name = "greedy_logits" if key.startswith("greedy.") else "logits"
            scales[name] = max(scales.get(name, 0.0), float(np.abs(value).max()) if value.size else 0.0)
    return scales


def keep_columns(out: dict) -> None:
    """Slice every ``*.logits`` array to ``logits.columns`` when the vocabulary is larger than FULL_VOCAB_UP_TO."""
    names = [k for k in out if k.endswith(".logits")]
    if not names or out[names[0]].shape[-1] <= FULL_VOCAB_UP_TO:
        return
    vocab = out[names[0]].shape[-1]
    top = [np.argsort(out[k], axis=-1)[..., -TOP_COLUMNS:].ravel() for k in names if ".reference." in k]
    sample = np.random.default_rng(0).choice(vocab, RANDOM_COLUMNS, replace=False)
    columns = np.unique(np.concatenate([sample, *top])).astype(np.int64)
    for k in names:
        out[k] = out[k][..., columns]
    out["logits.columns"] = columns
