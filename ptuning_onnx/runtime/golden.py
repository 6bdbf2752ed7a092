"""Check an exported folder on the host that serves it, without torch: ``golden.npz`` through the runtime.

Every export whose parity passed saves the gate's inputs and the PyTorch reference's outputs as ``golden.npz``
(export/golden.py). ``verify_golden`` runs those inputs through the runtime's own code: its sessions, on the provider
it really got, and its decoding loop (IOBinding and the device-resident KV cache on CUDA). It compares by the rule
the export was checked with (tolerance.py): max abs diff <= atol (+ rtol x output scale for fp16) for plain graphs,
error <= 0.75 of the prompt's own effect for int8/int4 graphs. Order: names, then shapes, then values.

Decoding steps are teacher-forced: each step is fed the reference's token, and its logits are compared. fp32 must
also pick the reference's token at every step (its arg-max), which is the same as free-running greedy decoding
giving the same tokens. fp16 and quantized graphs report that agreement without gating on it: their logits may
legitimately swap a near-tie (within the tolerance, for fp16), and one swap changes every later free-running token.

A negative control runs too: the graph's outputs against a reference with a perturbed prompt (saved beside the
reference's) must FAIL the same rule, or the check cannot see the prompt.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .. import manifest as mf
from ..errors import ManifestError, ParityError
from ..tolerance import REL_LIMIT, MaxDiffs, RelativeErrors, default_atol, default_rtol
from .loader import load
from .model import RuntimeModel, _Generative
from .session import GraphRunner
from .validation import GenerationParams, InputError, check_batch
from . import generation as gen

_CASE = re.compile(r"case(\d+)\.input_ids")


class GoldenMismatchError(ParityError):
    """The runtime's outputs differ from the reference's in ``golden.npz`` beyond the folder's tolerance (or its
    negative control passed). ``.report`` holds the full report."""

    report: Optional[dict] = None


class NoGoldenError(ManifestError):
    """The folder has no ``golden.npz``: exported with ``--skip-verify``, or by a version that did not write it."""


def read_golden(folder: Union[str, os.PathLike], manifest: dict) -> dict:
    """``{name: array}`` from ``folder/golden.npz``, after checking its sha256 against the manifest; no pickle."""
    folder = Path(folder)
    if mf.GOLDEN_NAME not in (manifest.get("files") or {}):
        raise NoGoldenError(f"{folder} has no {mf.GOLDEN_NAME} (exported with --skip-verify, or by an older version); "
                            "re-export it, or check it against PyTorch with ptuning-verify --reference")
    mf.verify_files(folder, {"files": {mf.GOLDEN_NAME: manifest["files"][mf.GOLDEN_NAME]}})
    path = folder / mf.GOLDEN_NAME
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ManifestError(f"{path} is not a readable golden file: {exc}") from None


class _Forced:
    """A token chooser for the runtime's decoding loop that feeds the reference's tokens (B, T) back in (teacher
    forcing) and records the logits (B, V) each step produced."""

    done = False

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens
        self.logits: list = []

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        self.logits.append(np.array(logits, np.float32))
        return self.tokens[:, len(self.logits) - 1]


def _outputs(model: RuntimeModel, ids: np.ndarray, mask: np.ndarray, dec: Optional[np.ndarray],
             prompt_ids: Optional[np.ndarray] = None) -> dict:
    """One golden case through the model's sessions: ``{output name: host array}``, named like golden.npz's.
    ``prompt_ids``: each row's adapter (multi-prompt folders)."""
    def runner(graph: str) -> GraphRunner:
        return GraphRunner(model.sessions[graph], model.device, model.device_id)

    if model.task == "causal-lm":
        session = model.sessions["model"]
        feed = {"input_ids": ids, "attention_mask": mask, **gen.empty_past(session, ids.shape[0])}
        if "position_ids" in gen.graph_inputs(session):
            feed["position_ids"] = gen.positions(mask)
        if prompt_ids is not None:
            feed["prompt_ids"] = prompt_ids
        return runner("model").run(feed, to_host=("logits",))[0]
    if model.task == "seq2seq-lm":
        if dec is None:
            raise ManifestError("golden.npz: a seq2seq case lacks decoder_input_ids")
        extra = {} if prompt_ids is None else {"prompt_ids": prompt_ids}
        enc = runner("encoder_model").run({"input_ids": ids, "attention_mask": mask, **extra},
                                          to_host=("last_hidden_state",))[0]["last_hidden_state"]
        feed = {"input_ids": dec, "encoder_attention_mask": mask, "encoder_hidden_states": enc, **extra,
                **gen.empty_past(model.sessions["decoder_model"], ids.shape[0])}
        logits = runner("decoder_model").run(feed, to_host=("logits",))[0]["logits"]
        return {"last_hidden_state": enc, "logits": logits}
    names = [o.name for o in model.sessions["model"].get_outputs()]
    host = runner("model").run(model._encoder_feed(ids, mask, prompt_ids), to_host=names)[0]
    return {name: host[name] for name in names}


def _compared(task: str, name: str, got: np.ndarray, mask: np.ndarray, quantized: bool):
    """(graph output as the reference holds it, positions compared or None): parity.py's ``_compare`` and
    parity_quantized.py's ``check_quantized``, rule for rule."""
    if task == "seq2seq-lm" and name == "last_hidden_state":
        n = got.shape[1] - mask.shape[1]  # the encoder keeps the n virtual rows; the reference holds user rows only
        return got[:, n:], (None if quantized else mask)
    per_position = task in ("causal-lm", "token-cls", "feature-extraction") and name in ("logits",
                                                                                        "last_hidden_state")
    return got, (mask if per_position else None)


def _prompt_ids(golden: dict, name: str, adapters: Optional[dict], batch: int) -> Optional[np.ndarray]:
    """A multi-prompt folder's ``<case>.prompt_ids`` (B,), checked against the folder's adapter ids; None for a
    single-adapter folder, whose golden has none."""
    value = golden.get(name)
    if adapters is None and value is None:
        return None
    if adapters is None or value is None:
        raise ManifestError(f"golden.npz: {name} " + ("is missing (a multi-prompt folder)" if value is None
                                                      else "is there but the folder holds one prompt"))
    if value.dtype.kind != "i" or value.shape != (batch,) or value.min() < 0 or value.max() >= len(adapters):
        raise ManifestError(f"golden.npz: {name} must be {batch} adapter ids in [0, {len(adapters)})")
    return value.astype(np.int64)


def _cases(golden: dict, task: str, vocab: int, adapters: Optional[dict] = None) -> list:
    """[(index, ids, mask, decoder ids or None, {reference outputs}, {control outputs}, prompt ids or None)] in
    case order."""
    cases = []
    for index in sorted(int(m.group(1)) for m in map(_CASE.fullmatch, golden) if m):
        prefix = f"case{index}."
        try:
            ids, mask = check_batch(golden[prefix + "input_ids"], golden.get(prefix + "attention_mask"),
                                    vocab_size=vocab)
            dec = golden.get(prefix + "decoder_input_ids")
            if dec is not None:
                dec = check_batch(dec, None, vocab_size=vocab)[0]
        except InputError as exc:
            raise ManifestError(f"golden.npz case {index}: {exc}") from None
        if task == "seq2seq-lm" and dec is None:
            raise ManifestError(f"golden.npz case {index} lacks decoder_input_ids")
        want = {k[len(prefix + "reference."):]: v for k, v in golden.items() if k.startswith(prefix + "reference.")}
        ctrl = {k[len(prefix + "control."):]: v for k, v in golden.items() if k.startswith(prefix + "control.")}
        if not want:
            raise ManifestError(f"golden.npz case {index} has no reference outputs")
        cases.append((index, ids, mask, dec, want, ctrl, _prompt_ids(golden, prefix + "prompt_ids", adapters,
                                                                      ids.shape[0])))
    if not cases:
        raise ManifestError("golden.npz holds no cases")
    return cases


def verify_golden(model_or_folder: Union[RuntimeModel, str, os.PathLike], provider: str = "auto", *,
                  threads: Optional[int] = None, raise_on_mismatch: bool = True) -> dict:
    """Run ``golden.npz`` through the runtime; return the report, or raise ``GoldenMismatchError`` (with
    ``.report``) on a mismatch (``raise_on_mismatch=False``: return the failed report instead).

    A folder is loaded with ``load(folder, provider=provider, threads=threads)`` (every file's sha256 checked); a
    loaded model is used as it is, on its own provider. Raises ``NoGoldenError`` when the folder has no golden file
    and ``ManifestError`` when it was modified. Report keys: ``passed``, ``gate`` ("exact"/"quantized"),
    ``provider`` (what onnxruntime really used) and ``providers`` per graph, ``max_abs_diff`` and ``tolerance``
    per output (exact) or ``relative_error`` and ``rel_limit`` (quantized), ``token_agreement`` (share of decoding
    steps whose arg-max is the reference's token), ``negative_control``, ``problems``.
    """
    model = model_or_folder if isinstance(model_or_folder, RuntimeModel) else load(
        model_or_folder, provider=provider, threads=threads)
    manifest, task = model.manifest, model.task
    golden = read_golden(model.path, manifest)
    entry = manifest.get("golden") or {}
    dtype, quantize = manifest.get("dtype", "fp32"), manifest.get("quantize")
    quantized = bool(quantize)
    first = next(iter(model.providers.values()))
    report: dict = {"gate": "quantized" if quantized else "exact", "task": task, "dtype": dtype,
                    "quantize": quantize, "provider": first[0], "providers": model.providers,
                    "device": model.device, "folder": str(model.path)}
    cases = _cases(golden, task, model.id_limit, model.adapters)  # a template's placeholders included
    columns = golden.get("logits.columns")  # large vocabularies: the reference keeps a column subset
    if columns is not None and (columns.ndim != 1 or columns.dtype.kind != "i" or columns.size == 0
                                or columns.min() < 0 or columns.max() >= model.vocab_size):
        raise ManifestError("golden.npz: logits.columns must be a non-empty list of vocabulary ids")
    if quantized:
        limit = float(entry.get("rel_limit", REL_LIMIT))
        errors = RelativeErrors()
        report["rel_limit"] = limit
    else:
        atol = float(entry.get("atol", default_atol(dtype)))
        rtol = float(entry.get("rtol", default_rtol(dtype)))
        scales = entry.get("scales")  # large vocabularies: the full logits' scale, as the export's bound used
        main, control = MaxDiffs(atol, rtol, scales), MaxDiffs(atol, rtol, scales)
        report.update(atol=atol, rtol=rtol)
    problems: list = []
    for index, ids, mask, dec, want, ctrl, prompt_ids in cases:
        out = _outputs(model, ids, mask, dec, prompt_ids)
        if columns is not None and "logits" in out:
            out["logits"] = out["logits"][..., columns]
        for name in want:
            if name not in out:  # names first
                problems.append(f"case {index}: the graph has no output {name!r} (it has {sorted(out)})")
                continue
            got, where = _compared(task, name, out[name], mask, quantized)
            if quantized:
                if name not in ctrl:
                    raise ManifestError(f"golden.npz case {index} lacks the control's {name} (quantized gate)")
                if got.shape != want[name].shape:
                    problems.append(f"{name}: shape {list(got.shape)} != reference {list(want[name].shape)}")
                    continue
                errors.add(name, got, want[name], ctrl[name], where)
            else:
                main.values(name, got, want[name], where)
                if name in ctrl:
                    control.values(name, got, ctrl[name], where)
    if "greedy.tokens" in golden:
        if not isinstance(model, _Generative):
            raise ManifestError(f"golden.npz has decoding steps but {task} does not generate")
        tokens, want_logits = golden["greedy.tokens"], _array(golden, "greedy.reference.logits")
        ids, mask = check_batch(_array(golden, "greedy.input_ids"), _array(golden, "greedy.attention_mask"),
                                vocab_size=model.id_limit)
        forced = _Forced(check_batch(tokens, None, vocab_size=model.vocab_size)[0])
        prompt_ids = _prompt_ids(golden, "greedy.prompt_ids", model.adapters, ids.shape[0])
        for _ in model._steps(ids, mask, forced, GenerationParams(max_new_tokens=int(tokens.shape[1])), prompt_ids):
            pass  # the runtime's own loop: prefill with logits_to_keep, then the KV cache, step by step
        got = np.stack(forced.logits, 1)  # (B, T, V)
        agree = got.argmax(-1) == tokens if got.shape[:2] == tokens.shape else np.zeros(tokens.shape, bool)
        full = got  # arg-max over the whole vocabulary; values compared on the golden columns
        if columns is not None:
            got = got[..., columns]
        report.update(greedy_steps=int(tokens.shape[1]), token_agreement=float(agree.mean()))
        if quantized:
            errors.add("greedy_logits", got, want_logits, _array(golden, "greedy.control.logits"))
        else:
            main.values("greedy_logits", got, want_logits)
            if dtype == "fp32":
                main.tokens(full.argmax(-1), tokens)
    report["cases"] = len(cases)
    if not quantized and not control.max and not problems:
        raise ManifestError("golden.npz has no negative-control outputs (case<i>.control.*)")
    if quantized:
        rel, against_control = errors.ratios(errors.err), errors.ratios(errors.control)
        passed = not problems and all(v <= limit for v in rel.values())
        control_failed = any(v > limit for v in against_control.values())
        report.update(relative_error=rel, top1_agreement=errors.top1_agreement(),
                      negative_control={"relative_error": against_control, "failed_as_expected": control_failed})
        detail = "; ".join(problems) or ("error relative to the prompt's own effect " + _worst(rel)
                                         + f" exceeds {limit:g}")
    else:
        problems += main.problems
        passed = not problems and main.passed
        control_failed = bool(control.max) and not control.passed
        report.update(max_abs_diff=main.max, tolerance={k: main.bound(k) for k in main.max},
                      negative_control={"max_abs_diff": control.max, "failed_as_expected": control_failed})
        bound = f"atol {atol:g}" + (f" + rtol {rtol:g} x output scale" if rtol else "")
        detail = "; ".join(problems) or f"max abs diff {_worst(main.max)} exceeds {bound}"
    report.update(passed=passed and control_failed, problems=problems)
    if not passed:
        return _fail(report, f"{model.path}: the runtime's outputs on {report['provider']} differ from "
                             f"{mf.GOLDEN_NAME}: {detail}", raise_on_mismatch)
    if not control_failed:
        return _fail(report, f"{model.path}: negative control passed: the outputs are as close to a perturbed "
                             f"prompt's as the tolerance allows, so this check cannot see the prompt",
                     raise_on_mismatch)
    return report


def _array(golden: dict, name: str) -> np.ndarray:
    if name not in golden:
        raise ManifestError(f"golden.npz lacks {name}")
    return golden[name]


def _worst(values: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in values.items())


def _fail(report: dict, message: str, raise_on_mismatch: bool) -> dict:
    report.update(passed=False, error=message)
    if not raise_on_mismatch:
        return report
    err = GoldenMismatchError(message)
    err.report = report
    raise err
