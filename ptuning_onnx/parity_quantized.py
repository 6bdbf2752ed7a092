"""The parity gate for quantized graphs (int8, int4): teacher-forced, and judged against the prompt's own effect.

Exact equality is the wrong question for a quantized graph: quantization legitimately moves every output, and
free-running greedy decoding turns one flipped near-tie into a different continuation. So this gate asks two
questions a quantized export must answer, and the export asks them in this order:

1. Before quantizing, the fp32 graph passes the EXACT gate (``parity.check_parity``, 1e-4). That is where a wrong
   prompt, wrong positions or a dropped virtual token are caught with certainty, however small their effect.
   Quantization then rewrites MatMul weights only.
2. The quantized graph (this module): on the padded 3-row case of length 7, and along the reference's greedy
   tokens fed to both sides (teacher forcing, through the KV cache), the error
   ``||onnx - reference||`` must be at most ``REL_LIMIT`` of the prompt's own effect
   ``||reference with a perturbed prompt - reference||``, output by output (logits centred per position, since
   softmax ignores a shift shared by all classes). Random and trained weights are
   judged alike, because both sides of the ratio scale with the model. The negative control measures the graph
   against the perturbed reference; it must land above the same limit.

Measured (teacher-forced logits, ratio to the prompt's effect): tiny Llama int8 0.02, int4 0.17; tiny GPT-2 int4
0.27; BERT seq-cls int4 0.004. A wrong prompt lands at 1 or above.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .config import TaskType
from .parity import ReferenceMemo, as_tensor, failure, perturbed, reference_case, reference_greedy
from .parity_onnx import (BATCHES, GREEDY_STEPS, LENGTHS, Graphs, check_names, greedy_onnx, run_case,
                          run_outputs)
from .reference import PTuningModel
from .tolerance import REL_LIMIT
from .tolerance import RelativeErrors as _Errors


@torch.no_grad()
def _forced_reference(ref: PTuningModel, ids, mask, tokens) -> np.ndarray:
    """(B, T, V) logits that choose each of ``tokens`` given the input and the tokens before it."""
    steps = tokens.shape[1]
    if ref.task == TaskType.SEQ_2_SEQ_LM:
        start = np.full((ids.shape[0], 1), ref.base.config.decoder_start_token_id, np.int64)
        dec = np.concatenate([start, tokens[:, :-1]], 1)
        return ref(as_tensor(ids), as_tensor(mask), decoder_input_ids=as_tensor(dec)).logits.float().numpy()
    full = np.concatenate([ids, tokens[:, :-1]], 1)
    full_mask = np.concatenate([mask, np.ones_like(tokens[:, :-1])], 1)
    return ref(as_tensor(full), as_tensor(full_mask)).logits[:, -steps:].float().numpy()


def _many_rows(manifest: dict, seed: int, rows: int = 16, length: int = 12):
    """(ids, mask) of ``rows`` random rows, every third one padded on the model's padding side; with the
    template's inline slots in each row for a templated folder (parity_template.py)."""
    cfg = manifest["model"]
    length = min(length, cfg["max_user_tokens"] or length)
    if manifest.get("template"):  # None where the slots do not fit the model's positions
        from .parity_template import template_cases

        return next(template_cases(manifest["template"], cfg["vocab_size"], cfg["max_user_tokens"],
                                   cfg["padding_side"], seed + 2, (rows,), (length,), pad_every=3), None)
    rng = np.random.default_rng(seed + 2)
    ids = rng.integers(0, cfg["vocab_size"], size=(rows, length), dtype=np.int64)
    mask = np.ones_like(ids)
    for row in range(0, rows, 3):
        real = max(1, length - 1 - row % length)
        if cfg["padding_side"] == "left":
            mask[row, : length - real] = 0
        else:
            mask[row, real:] = 0
    return ids, mask


def check_quantized(folder, ref: PTuningModel, manifest: dict, *, device: str = "cpu", seed: int = 0,
                    rel_limit: float = REL_LIMIT, exact: Optional[dict] = None,
                    memo: Optional[ReferenceMemo] = None, graphs: Optional[Graphs] = None) -> dict:
    """Gate a quantized folder; return the report, or raise ``ParityError`` (with ``.report``).

    ``exact``: the fp32 graph's exact parity report from before quantization, kept in this report. ``memo``: the
    reference outputs the exact gate computed on the same inputs, reused. ``graphs``: the folder's sessions, when
    the caller made them (a multi-prompt folder seen as one adapter's, parity_multi.py)."""
    from pathlib import Path

    ref = ref.eval()
    graphs = graphs if graphs is not None else Graphs(Path(folder), manifest, device)
    task = ref.task
    report = {"gate": "quantized", "quantize": manifest.get("quantize"), "rel_limit": rel_limit, "device": device,
              "seed": seed, "batches": list(BATCHES), "lengths": list(LENGTHS), "fp32_exact": exact}
    problems = check_names(graphs, manifest)
    if problems:
        report.update(passed=False, problems=problems)
        raise failure("names differ: " + "; ".join(problems), report)
    control_ref = perturbed(ref, seed)
    memo = memo if memo is not None else ReferenceMemo()
    # The padded 3-row case of length 7 (every shape was already checked exactly on the fp32 graph) and the decoding
    # steps: the reference's and the control's outputs for it are in the memo from that check, so a 1B model pays
    # only for the control's teacher-forced steps.
    # A model with few positions has only shorter cases: then the longest of them.
    padded = run_outputs(graphs, manifest, task, seed, batches=(max(BATCHES),))
    # (the cases come in ascending length; the last is the exact gate's decoding case when no length is 7, even
    # where a template's slots make several cases equally long)
    runs = [r for r in padded if r[0][0].shape[1] == 7] or padded[-1:]
    if task == TaskType.SEQ_CLS:
        # A classifier gives one row of a few logits per input: 3 rows of 2 labels are 3 numbers once centred, too
        # few for a norm to mean anything. Add 16 rows (cheap: the graph pools one position).
        many = _many_rows(manifest, seed)
        if many is not None:
            runs.append(run_case(graphs, task, *many))
    errors = _Errors()
    for case, out in runs:
        arrays = [c for c in case if c is not None]
        want = memo.get("reference", "case", arrays, lambda case=case: reference_case(ref, case))
        ctrl = memo.get("control", "case", arrays, lambda case=case: reference_case(control_ref, case))
        for name in want:
            if name == "present":
                continue  # the cache is exercised by the teacher-forced steps below
            where = case[1] if name == "logits" and task in (TaskType.CAUSAL_LM, TaskType.TOKEN_CLS) else None
            if name == "last_hidden_state" and task == TaskType.FEATURE_EXTRACTION:
                where = case[1]
            got = out[name][:, ref.n:] if name == "last_hidden_state" and task == TaskType.SEQ_2_SEQ_LM else out[name]
            errors.add(name, got, want[name], ctrl[name], where)
    if task in (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM):
        ids, mask = next((c for c, _ in runs if c[0].shape[0] == 3 and c[0].shape[1] == 7), runs[-1][0])[:2]
        # The reference's greedy logits ARE its teacher-forced logits along its own tokens.
        tokens, want = memo.get("reference", "greedy", [ids, mask],
                                lambda: reference_greedy(ref, ids, mask, GREEDY_STEPS))
        ctrl = memo.get("control", "forced", [ids, mask, tokens],
                        lambda: _forced_reference(control_ref, ids, mask, tokens))
        _, got = greedy_onnx(graphs, manifest, task, ids, mask, tokens.shape[1], forced=tokens)
        errors.add("greedy_logits", got, want, ctrl)
        report["greedy_steps"] = GREEDY_STEPS
    rel, control = errors.ratios(errors.err), errors.ratios(errors.control)
    passed = all(v <= rel_limit for v in rel.values())
    control_failed = any(v > rel_limit for v in control.values())
    report.update(
        passed=passed and control_failed,
        relative_error=rel,
        top1_agreement=errors.top1_agreement(),
        negative_control={"relative_error": control, "failed_as_expected": control_failed},
        cases=len(runs),
        problems=[],
    )
    if not passed:
        worst = ", ".join(f"{k}={v:.3g}" for k, v in rel.items())
        raise failure(f"quantized graph differs from the PyTorch reference by more than {rel_limit:g} of the "
                       f"prompt's own effect: {worst}", report)
    if not control_failed:
        close = ", ".join(f"{k} {rel[k]:.2f} vs {control[k]:.2f}" for k in rel)
        raise failure(f"negative control passed: the {manifest.get('quantize')} graph is about as close to a "
                       f"perturbed prompt's outputs as to its own prompt's ({close}, in units of the prompt's "
                       "effect), so quantization erases what the prompt does on this model; use int8 or fp32",
                       report)
    return report
