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

BATCHES, LENGTHS, GREEDY_STEPS = (1, 3), (1, 7, 33), 16
# Tolerances (fp32 1e-4; fp16 1e-2 + 2% of output scale) live in tolerance.py, torch-free, so that the runtime's
# golden check (runtime/golden.py) applies the same rule. Quantized graphs have their own gate: parity_quantized.py.


class _Graphs:
    def __init__(self, folder: Path, manifest: dict, device: str):
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.sessions = {}
        for name in manifest["graphs"]:
            options = ort.SessionOptions()
            options.log_severity_level = 3  # the optional-input initializer warning is expected
            session = ort.InferenceSession(str(mf.graph_path(folder, manifest, name)), options, providers=providers)
            if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
                raise ParityError("asked to verify on CUDA but onnxruntime gave only " + str(session.get_providers()))
            self.sessions[name] = session
        self.float = np.float16 if manifest["dtype"] == "fp16" else np.float32

    prompt_id = 0  # multi-prompt graphs (export/multi.py): the adapter of rows whose feed has no prompt_ids

    def run(self, graph: str, feed: dict) -> dict:
        session = self.sessions[graph]
        if "prompt_ids" not in feed and any(i.name == "prompt_ids" for i in session.get_inputs()):
            feed = {**feed, "prompt_ids": np.full(len(feed["input_ids"]), self.prompt_id, np.int64)}
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, feed), strict=True))

    def only_inputs(self, graph: str, feed: dict) -> dict:
        """``feed`` without names the graph lacks (``position_ids`` is absent for models without positions)."""
        session = self.sessions[graph]
        names = {i.name for i in session.get_inputs()} | {i.name for i in session.get_overridable_initializers()}
        return {k: v for k, v in feed.items() if k in names}

    def past_names(self, graph: str) -> list:
        return [i.name for i in self.sessions[graph].get_inputs() if i.name.startswith("past_key_values.")]

    def empty_past(self, graph: str, batch: int) -> dict:
        out = {}
        for i in self.sessions[graph].get_inputs():
            if i.name.startswith("past_key_values."):
                out[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), self.float)
        return out


def _cases(vocab: int, limit: Optional[int], padding_side: str, seed: int):
    """Random (input_ids, attention_mask) pairs; in 3-row batches rows 1 and 2 are padded."""
    rng = np.random.default_rng(seed)
    for batch in BATCHES:
        for length in LENGTHS:
            if limit is not None and length > limit:
                continue
            ids = rng.integers(0, vocab, size=(batch, length), dtype=np.int64)
            mask = np.ones_like(ids)
            if batch == 3 and length > 1:
                for row, real in ((1, max(1, length - 3)), (2, max(1, length // 2))):
                    if padding_side == "left":
                        mask[row, : length - real] = 0
                    else:
                        mask[row, real:] = 0
            yield ids, mask


def _positions(mask: np.ndarray) -> np.ndarray:
    return np.clip(np.cumsum(mask, -1) - 1, 0, None)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def _run_case(graphs: _Graphs, task: TaskType, ids, mask, dec_ids=None) -> tuple:
    """One (ids, mask) batch through onnxruntime: returns (case, outputs)."""
    batch = ids.shape[0]
    if task == TaskType.CAUSAL_LM:
        feed = graphs.only_inputs("model", {"input_ids": ids, "attention_mask": mask,
                                            "position_ids": _positions(mask), **graphs.empty_past("model", batch)})
        return (ids, mask), graphs.run("model", feed)
    if task == TaskType.SEQ_2_SEQ_LM:
        enc = graphs.run("encoder_model", {"input_ids": ids, "attention_mask": mask})
        dec = graphs.run("decoder_model", {"input_ids": dec_ids, "encoder_attention_mask": mask,
                                           "encoder_hidden_states": enc["last_hidden_state"],
                                           **graphs.empty_past("decoder_model", batch)})
        return (ids, mask, dec_ids), {**enc, **dec}
    feed = {"input_ids": ids, "attention_mask": mask}
    types = None
    if "token_type_ids" in [i.name for i in graphs.sessions["model"].get_inputs()]:
        feed["token_type_ids"] = types = np.zeros_like(ids)
    return (ids, mask, types), graphs.run("model", feed)


def _run_outputs(graphs: _Graphs, manifest: dict, task: TaskType, seed: int, batches=BATCHES):
    """Run every case (of the given batch sizes) through onnxruntime once; returns [(case, onnx outputs)]. The
    cases are drawn in the same order whatever ``batches`` keeps, so a subset has the same inputs."""
    cfg = manifest["model"]
    vocab, limit = cfg["vocab_size"], cfg["max_user_tokens"]
    results = []
    cases = _cases(vocab, None if limit is None else limit - GREEDY_STEPS, cfg["padding_side"], seed)
    if manifest.get("template"):  # inline virtual slots: placeholder ids in the inputs (parity_template.py)
        from .parity_template import template_cases

        cases = template_cases(manifest["template"], vocab, None if limit is None else limit - GREEDY_STEPS,
                               cfg["padding_side"], seed, BATCHES, LENGTHS)
    for ids, mask in cases:
        dec_ids = np.random.default_rng(seed + 1).integers(0, vocab, size=(ids.shape[0], 3), dtype=np.int64)
        if ids.shape[0] in batches:
            results.append(_run_case(graphs, task, ids, mask, dec_ids))
    return results


def _padding_invariance(graphs: _Graphs, task: TaskType, runs, diffs: "_Diffs") -> None:
    """ONNX against ONNX: each padded row of a batch must give what the row gives alone (the batch-invariance
    contract). Models whose attention counts pad positions (sliding windows shorter than the input, some ALiBi
    implementations) fail this while still matching their own PyTorch reference."""
    per_position = {"logits"} if task in (TaskType.CAUSAL_LM, TaskType.TOKEN_CLS) else set()
    if task == TaskType.FEATURE_EXTRACTION:
        per_position = {"last_hidden_state"}
    for case, out in runs:
        ids, mask = case[0], case[1]
        for row in np.flatnonzero((mask == 0).any(-1)):
            real = mask[row].astype(bool)
            dec = None if len(case) < 3 or case[2] is None or task != TaskType.SEQ_2_SEQ_LM else case[2][row:row + 1]
            _, alone = _run_case(graphs, task, ids[row:row + 1, real], mask[row:row + 1, real], dec)
            for name, value in alone.items():
                if name.startswith("present."):
                    continue
                got = out[name][row:row + 1]
                if name in per_position:
                    got = got[:, real]
                elif name == "last_hidden_state":  # seq2seq encoder: n virtual rows, then the user's
                    n = value.shape[1] - int(real.sum())
                    got = np.concatenate([got[:, :n], got[:, n:][:, real]], 1)
                diffs.values(name, got, value)


def _greedy_onnx(graphs: _Graphs, manifest: dict, task: TaskType, ids, mask, steps: int, forced=None):
    """Decode in onnxruntime through the KV cache; returns (tokens (B, steps), logits (B, steps, V)).

    Greedy, or teacher-forced along ``forced`` (B, steps): each step then feeds ``forced``'s token, not its own."""
    batch = ids.shape[0]
    tokens, logits = [], []

    def choose(step: int, last: np.ndarray) -> np.ndarray:
        token = last.argmax(-1)[:, None].astype(np.int64) if forced is None else forced[:, step:step + 1]
        tokens.append(token), logits.append(last)
        return token

    if task == TaskType.CAUSAL_LM:
        feed = graphs.only_inputs("model", {"input_ids": ids, "attention_mask": mask, "position_ids": _positions(mask),
                                            "logits_to_keep": np.array(1, np.int64),
                                            **graphs.empty_past("model", batch)})
        past_names = graphs.past_names("model")
        for step in range(steps):
            out = graphs.run("model", feed)
            token = choose(step, out["logits"][:, -1])
            mask = np.concatenate([mask, np.ones_like(token)], 1)
            feed = graphs.only_inputs("model", {"input_ids": token, "attention_mask": mask,
                                                "position_ids": _positions(mask)[:, -1:],
                                                "logits_to_keep": np.array(1, np.int64)})
            feed.update({name: out[name.replace("past_key_values", "present")] for name in past_names})
    else:
        enc = graphs.run("encoder_model", {"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
        token = np.full((batch, 1), manifest["model"]["decoder_start_token_id"], np.int64)
        past = graphs.empty_past("decoder_model", batch)
        for step in range(steps):
            out = graphs.run("decoder_model", {"input_ids": token, "encoder_attention_mask": mask,
                                               "encoder_hidden_states": enc, **past})
            token = choose(step, out["logits"][:, -1])
            past = {name: out[name.replace("past_key_values", "present")] for name in past}
    return np.concatenate(tokens, 1), np.stack(logits, 1)


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
    ids, mask = _t(case[0]), _t(case[1])
    if ref.task == TaskType.CAUSAL_LM:
        from .export.wrappers import _layers

        r = ref.base(**ref.extend_inputs(ids, mask), use_cache=True)
        present = [(k.float().numpy(), v.float().numpy()) for k, v in _layers(r.past_key_values)]
        return {"logits": r.logits[:, n:].float().numpy(), "present": present}
    if ref.task == TaskType.SEQ_2_SEQ_LM:
        r = ref(ids, mask, decoder_input_ids=_t(case[2]))
        return {"last_hidden_state": r.encoder_last_hidden_state.float().numpy(), "logits": r.logits.float().numpy()}
    types = None if case[2] is None else _t(case[2])
    if ref.task == TaskType.SEQ_CLS:
        return {"logits": ref(ids, mask, types).logits.float().numpy()}
    key = "logits" if ref.task == TaskType.TOKEN_CLS else "last_hidden_state"
    return {key: ref(ids, mask, types)[key].float().numpy()}


@torch.no_grad()
def reference_greedy(ref: PTuningModel, ids, mask, steps: int) -> tuple:
    """(tokens (B, steps), logits (B, steps, V)): greedy through the reference's KV cache."""
    tokens, logits = ref.greedy(_t(ids), _t(mask), steps, return_logits=True)
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


def _check_names(graphs: _Graphs, manifest: dict) -> list:
    problems = []
    for name, session in graphs.sessions.items():
        declared = manifest["graphs"][name]
        inputs = session.get_inputs() + session.get_overridable_initializers()
        for kind, actual in (("inputs", inputs), ("outputs", session.get_outputs())):
            want = [x["name"] for x in declared[kind]]
            got = [x.name for x in actual]
            if want != got:
                problems.append(f"{name} {kind}: graph has {got}, manifest declares {want}")
    return problems


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
    graphs = _Graphs(folder, manifest, device)
    task = ref.task
    report = {"atol": atol, "rtol": rtol, "device": device, "seed": seed, "batches": list(BATCHES),
              "lengths": list(LENGTHS)}
    problems = _check_names(graphs, manifest)
    if problems:
        report.update(passed=False, problems=problems)
        raise _failure("names differ: " + "; ".join(problems), report)
    runs = _run_outputs(graphs, manifest, task, seed)
    greedy = None
    if task in (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM):
        ids, mask = next((c for c, _ in runs if c[0].shape[0] == 3 and c[0].shape[1] == 7), runs[-1][0])[:2]
        greedy = ((ids, mask), _greedy_onnx(graphs, manifest, task, ids, mask, GREEDY_STEPS))
        report["greedy_steps"] = GREEDY_STEPS
    main = _Diffs(atol, rtol)
    memo = memo if memo is not None else ReferenceMemo()
    _compare(ref, runs, greedy, main, memo, "reference")
    invariance = _Diffs(atol, rtol)
    _padding_invariance(graphs, task, runs, invariance)
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
        raise _failure(f"ONNX output differs from the PyTorch reference: {detail}", report)
    if control.passed:
        raise _failure("negative control passed: a perturbed prompt met the tolerance, so this check cannot see "
                       "the prompt", report)
    return report


def _failure(message: str, report: dict) -> ParityError:
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
