"""Parity: the exported graphs, run in onnxruntime, against the PyTorch reference.

Order: names, then shapes, then values (max abs diff per output, user positions only). Inputs are random and on
shapes the export never saw: batch {1, 3}, sequence {1, 7, 33}, with padded rows. Generation tasks also decode 16
greedy steps through the KV cache and need identical tokens.

A negative control runs every time: the same comparison against a reference whose prompt was perturbed must FAIL.
If it passes, the check cannot see the prompt and is itself broken, which is an error too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import manifest as mf
from .config import TaskType, parse_task
from .errors import ConfigError, ParityError
from .reference import PTuningModel
from .tolerance import ATOL, RTOL_FP16, default_atol, default_rtol  # noqa: F401  (re-exported)
from .tolerance import MaxDiffs as _Diffs
from .parity_onnx import (BATCHES, GREEDY_STEPS, LENGTHS, Graphs, check_names, greedy_onnx, padding_invariance,
                          run_outputs)

# Tolerances (fp32 1e-4; fp16 1e-2 + 2% of output scale) live in tolerance.py, torch-free, so that the runtime's
# golden check (runtime/golden.py) applies the same rule. Quantized graphs have their own gate: parity_quantized.py.


def as_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


class ReferenceMemo:
    """The PyTorch reference's outputs per (role, input), so that the exact gate, the quantized gate and golden.npz
    of one export run each reference input once: on a 1.1B model every reference forward reads 4.4 GB of weights.

    ``entries`` lists what was computed, in order, with its inputs: the cases the gates compared, which the export
    saves as ``golden.npz`` (export/golden.py)."""

    def __init__(self):
        self._store: dict = {}

    @staticmethod
    def _key(role: str, kind: str, arrays) -> tuple:
        import hashlib

        digest = hashlib.sha256()
        for a in arrays:
            a = np.ascontiguousarray(a)
            digest.update(repr((a.dtype.str, a.shape)).encode())
            digest.update(a.tobytes())
        return role, kind, digest.hexdigest()

    def get(self, role: str, kind: str, arrays, compute):
        key = self._key(role, kind, arrays)
        if key not in self._store:
            self._store[key] = (tuple(arrays), compute())
        return self._store[key][1]

    def lookup(self, role: str, kind: str, arrays):
        """The stored outputs for these inputs, or None; never computes."""
        found = self._store.get(self._key(role, kind, arrays))
        return None if found is None else found[1]

    def entries(self, role: str, kind: str) -> list:
        """[(input arrays, outputs)] stored under (role, kind), in the order they were first computed."""
        return [value for key, value in self._store.items() if key[:2] == (role, kind)]


@torch.no_grad()
def reference_case(ref: PTuningModel, case) -> dict:
    """The reference's outputs for one parity case, as numpy, named like the graph's (``present`` a list)."""
    n = ref.n
    ids, mask = as_tensor(case[0]), as_tensor(case[1])
    if ref.task == TaskType.CAUSAL_LM:
        from .export.wrappers import _layers

        r = ref.base(**ref.extend_inputs(ids, mask), use_cache=True)
        present = [(k.float().numpy(), v.float().numpy()) for k, v in _layers(r.past_key_values)]
        return {"logits": r.logits[:, n:].float().numpy(), "present": present}
    if ref.task == TaskType.SEQ_2_SEQ_LM:
        r = ref(ids, mask, decoder_input_ids=as_tensor(case[2]))
        return {"last_hidden_state": r.encoder_last_hidden_state.float().numpy(), "logits": r.logits.float().numpy()}
    types = None if case[2] is None else as_tensor(case[2])
    if ref.task == TaskType.SEQ_CLS:
        return {"logits": ref(ids, mask, types).logits.float().numpy()}
    key = "logits" if ref.task == TaskType.TOKEN_CLS else "last_hidden_state"
    return {key: ref(ids, mask, types)[key].float().numpy()}


@torch.no_grad()
def reference_greedy(ref: PTuningModel, ids, mask, steps: int) -> tuple:
    """(tokens (B, steps), logits (B, steps, V)): greedy through the reference's KV cache."""
    tokens, logits = ref.greedy(as_tensor(ids), as_tensor(mask), steps, return_logits=True)
    return tokens.numpy(), logits.float().numpy()


def _compare(ref: PTuningModel, runs, greedy, diffs: _Diffs, memo: ReferenceMemo, role: str) -> None:
    for case, out in runs:
        arrays = [c for c in case if c is not None]
        want = memo.get(role, "case", arrays, lambda case=case: reference_case(ref, case))
        if ref.task == TaskType.CAUSAL_LM:
            diffs.values("logits", out["logits"], want["logits"], case[1])
            # The cache the next step reads: user positions only, the prompt's rows live inside the graph.
            for i, (key, value) in enumerate(want["present"]):
                for name, expected in ((f"present.{i}.key", key), (f"present.{i}.value", value)):
                    # The reference holds n + S positions, or only its last W with a sliding window; the graph
                    # holds the S user positions. Compare the trailing positions both hold.
                    got = out[name]
                    keep = min(got.shape[2], expected.shape[2])
                    diffs.values("present", got[:, :, got.shape[2] - keep:], expected[:, :, expected.shape[2] - keep:])
        elif ref.task == TaskType.SEQ_2_SEQ_LM:
            diffs.values("last_hidden_state", out["last_hidden_state"][:, ref.n:], want["last_hidden_state"], case[1])
            diffs.values("logits", out["logits"], want["logits"])
        elif ref.task == TaskType.SEQ_CLS:
            diffs.values("logits", out["logits"], want["logits"])
        else:
            key = "logits" if ref.task == TaskType.TOKEN_CLS else "last_hidden_state"
            diffs.values(key, out[key], want[key], case[1])
    if greedy is not None:
        (ids, mask), (tokens, logits) = greedy
        want_tokens, want_logits = memo.get(role, "greedy", [ids, mask],
                                            lambda: reference_greedy(ref, ids, mask, tokens.shape[1]))
        diffs.values("greedy_logits", logits, want_logits)
        diffs.tokens(tokens, want_tokens)


def perturbed(ref: PTuningModel, seed: int = 0) -> PTuningModel:
    """The negative control: the same base with a clearly different prompt."""
    templated = hasattr(ref, "with_prompt")  # every slot's rows, not only the prefix (reference_template.py)
    table = (ref.prompt_rows() if templated else ref.prompt_embeds(1)[0]).detach().float()
    noise = torch.randn(table.shape, generator=torch.Generator().manual_seed(seed))
    scale = max(float(table.abs().max()), 1.0)
    if templated:
        return ref.with_prompt((table + noise * scale).to(ref.base.dtype))
    return PTuningModel(ref.base, (table + noise * scale).to(ref.base.dtype), ref.task).eval()


def check_parity(folder: os.PathLike, ref: PTuningModel, manifest: dict, *, atol: float, rtol: float = 0.0,
                 device: str = "cpu", seed: int = 0, memo: Optional[ReferenceMemo] = None) -> dict:
    """Run the parity check; return the report, or raise ``ParityError`` (with ``.report``) on failure.

    ``memo``: reference outputs to reuse (and fill) across checks of one export."""
    folder = Path(folder)
    ref = ref.eval()
    graphs = Graphs(folder, manifest, device)
    task = ref.task
    report = {"atol": atol, "rtol": rtol, "device": device, "seed": seed, "batches": list(BATCHES),
              "lengths": list(LENGTHS)}
    problems = check_names(graphs, manifest)
    if problems:
        report.update(passed=False, problems=problems)
        raise failure("names differ: " + "; ".join(problems), report)
    runs = run_outputs(graphs, manifest, task, seed)
    greedy = None
    if task in (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM):
        ids, mask = next((c for c, _ in runs if c[0].shape[0] == 3 and c[0].shape[1] == 7), runs[-1][0])[:2]
        greedy = ((ids, mask), greedy_onnx(graphs, manifest, task, ids, mask, GREEDY_STEPS))
        report["greedy_steps"] = GREEDY_STEPS
    main = _Diffs(atol, rtol)
    memo = memo if memo is not None else ReferenceMemo()
    _compare(ref, runs, greedy, main, memo, "reference")
    invariance = _Diffs(atol, rtol)
    padding_invariance(graphs, task, runs, invariance)
    control = _Diffs(atol, rtol)
    # The control needs to show the check can see the prompt, not to cover every shape: the padded 3-row case of
    # length 7 does, at a fifth of the cost of the full set (which counts on a 1B model: each reference forward
    # there reads 4.4 GB of weights).
    _compare(perturbed(ref, seed), [r for r in runs if r[0][0].shape == (max(BATCHES), 7)] or runs[-1:], None,
             control, memo, "control")
    report.update(
        passed=main.passed and not control.passed,
        max_abs_diff=main.max,
        tolerance={k: main.bound(k) for k in main.max},
        problems=main.problems,
        negative_control={"max_abs_diff": control.max, "failed_as_expected": not control.passed},
        padding_invariant={"passed": invariance.passed, "max_abs_diff": invariance.max},
        cases=len(runs),
    )
    if not main.passed:
        worst = ", ".join(f"{k}={v:.3g}" for k, v in main.max.items())
        limit = f"atol {atol:g}" + (f" + rtol {rtol:g} x output scale" if rtol else "")
        detail = "; ".join(main.problems) or f"max abs diff {worst} exceeds {limit}"
        raise failure(f"ONNX output differs from the PyTorch reference: {detail}", report)
    if control.passed:
        raise failure("negative control passed: a perturbed prompt met the tolerance, so this check cannot see "
                       "the prompt", report)
    return report


def failure(message: str, report: dict) -> ParityError:
    report["passed"] = False
    report["error"] = message
    err = ParityError(message)
    err.report = report
    return err


def verify(folder: os.PathLike, *, base_model: Optional[os.PathLike] = None, adapter: Optional[os.PathLike] = None,
           report: Optional[os.PathLike] = None, atol: Optional[float] = None, device: str = "cpu") -> dict:
    """Re-run parity on an exported folder (the paths recorded at export time are used unless given)."""
    from .export.exporter import load_reference

    folder = Path(folder)
    manifest = mf.read_manifest(folder, verify=True)
    base_model = Path(base_model or manifest["base_model"]["name_or_path"])
    multi = bool(manifest.get("adapters"))  # a multi-prompt folder: its adapters' paths are in the manifest
    if multi and adapter is not None:
        raise ConfigError(f"{folder} holds {len(manifest['adapters'])} adapters, read from its manifest; --adapter "
                          "goes with a single-adapter folder")
    adapter = adapter or (manifest.get("adapter") or {}).get("path")
    if (not multi and (adapter is None or not Path(adapter).is_dir())) or not base_model.is_dir():
        raise ConfigError(f"base model or adapter of {folder} not found; pass --base-model and --adapter")
    if mf.sha256_file(base_model / "config.json") != manifest["base_model"]["config_sha256"]:
        raise ConfigError(f"{base_model}/config.json differs from the one {folder} was exported from")
    if multi:
        from .parity_multi import verify_multi

        return _reported(lambda: verify_multi(folder, manifest, base_model, atol=atol, device=device), report)
    ref = load_reference(base_model, adapter, parse_task(manifest["task"]))

    def check() -> dict:
        if manifest.get("quantize"):
            from .parity_quantized import check_quantized

            exact = (manifest.get("parity") or {}).get("fp32_exact")
            return check_quantized(folder, ref, manifest, device=device, exact=exact)
        tolerance = atol if atol is not None else default_atol(manifest["dtype"])
        return check_parity(folder, ref, manifest, atol=tolerance, rtol=default_rtol(manifest["dtype"]), device=device)

    return _reported(check, report)


def _reported(check, report: Optional[os.PathLike]) -> dict:
    """``check()``'s report, written to ``report`` when given, whether it passed or raised ``ParityError``."""
    try:
        result = check()
    except ParityError as exc:
        if report is not None:
            Path(report).write_text(json.dumps(getattr(exc, "report", None), indent=2, sort_keys=True))
        raise
    if report is not None:
        Path(report).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


def assert_parity(folder: os.PathLike, *, base_model: Optional[os.PathLike] = None,
                  adapter: Optional[os.PathLike] = None, atol: Optional[float] = None) -> dict:
    """pytest helper: ``assert_parity(export_dir)`` fails the test with the parity message on any mismatch."""
    try:
        return verify(folder, base_model=base_model, adapter=adapter, atol=atol)
    except ParityError as exc:
        raise AssertionError(str(exc)) from None
