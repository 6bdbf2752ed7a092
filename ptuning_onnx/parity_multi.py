"""Parity of a multi-prompt folder: each adapter's rows of ONE mixed, padded batch against that adapter alone.

The batch has two rows per adapter, in turn: one of 7 tokens and one padded (4, 1, 3, ... real tokens), so rows of
every adapter share the graph and padding at once. Each row is compared, on its real positions, with the PyTorch
reference of ITS adapter run on that row alone, unpadded (the same reference a single-adapter export is held to;
names, then shapes, then values). Causal LMs also decode ``GREEDY_STEPS`` greedy steps through the KV cache in the
mixed batch: tokens must equal each row's reference alone. Negative control: the same batch with every row given
another adapter's id (or, with one adapter, a perturbed prompt) must differ from the right reference by more than
the tolerance, for every row.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import manifest as mf
from .errors import ParityError
from .parity import ReferenceMemo
from .parity_onnx import Graphs
from .reference import PTuningModel
from .runtime import generation as gen

GREEDY_STEPS, LENGTH = 8, 7
PADDED = (4, 1, 3, 5, 2, 6)  # real tokens of each adapter's padded row, in turn


def _batch(names: list, vocab: int, side: str, seed: int):
    """(ids, mask, prompt_ids) for 2K rows: adapter k's unpadded row, then the padded rows."""
    rng = np.random.default_rng(seed)
    k = len(names)
    ids = rng.integers(0, vocab, size=(2 * k, LENGTH), dtype=np.int64)
    mask = np.ones_like(ids)
    for row in range(k, 2 * k):
        pad = LENGTH - PADDED[(row - k) % len(PADDED)]
        cut = slice(0, pad) if side == "left" else slice(LENGTH - pad, LENGTH)
        ids[row, cut], mask[row, cut] = 0, 0
    return ids, mask, np.tile(np.arange(k, dtype=np.int64), 2)


def _alone(ref: PTuningModel, ids: np.ndarray, output: str) -> np.ndarray:
    """The reference on one unpadded row (1, l) -> its per-position output (l, ...)."""
    row = torch.from_numpy(ids[None])
    with torch.no_grad():
        return ref(row, torch.ones_like(row))[output][0].float().numpy()


class _Graph:
    def __init__(self, folder: Path, manifest: dict):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # the optional-input initializer warning is expected
        self.session = ort.InferenceSession(str(mf.graph_path(folder, manifest, "model")), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict) -> dict:
        feed = {k: v for k, v in feed.items() if k in self.inputs}
        return dict(zip(self.outputs, self.session.run(None, feed), strict=True))

    def empty_past(self, batch: int) -> dict:
        return gen.empty_past(self.session, batch)


def _prefill(graph: _Graph, task: str, ids, mask, prompt_ids) -> dict:
    feed = {"input_ids": ids, "attention_mask": mask, "prompt_ids": prompt_ids, "token_type_ids": np.zeros_like(ids)}
    if task == "causal-lm":
        feed.update(position_ids=gen.positions(mask), **graph.empty_past(ids.shape[0]))
    return graph.run(feed)


def _greedy(graph: _Graph, ids, mask, prompt_ids, steps: int):
    """Greedy tokens (B, steps) and their logits (B, steps, V) through the graph's KV cache, mixed batch."""
    out = _prefill(graph, "causal-lm", ids, mask, prompt_ids)
    tokens, logits = [], []
    for step in range(steps):
        logits.append(out["logits"][:, -1])
        token = out["logits"][:, -1].argmax(-1)[:, None]
        tokens.append(token)
        if step == steps - 1:
            break
        mask = np.concatenate([mask, np.ones_like(token)], 1)
        feed = {"input_ids": token, "attention_mask": mask, "prompt_ids": prompt_ids,
                "position_ids": mask.sum(-1, keepdims=True) - 1}
        feed.update({name: out[name.replace("past_key_values", "present", 1)] for name in graph.empty_past(1)})
        out = graph.run(feed)
    return np.concatenate(tokens, 1), np.stack(logits, 1)


OUTPUT = {"causal-lm": "logits", "seq-cls": "logits", "token-cls": "logits", "feature-extraction": "last_hidden_state",
          "seq2seq-lm": "logits"}


def _real(value: np.ndarray, mask_row: np.ndarray, task: str) -> np.ndarray:
    """One row's graph output on its real positions ((l, ...) or, for seq-cls, as it is)."""
    return value if task == "seq-cls" else value[mask_row == 1]


def check_multi(folder: os.PathLike, refs: dict, manifest: dict, *, atol: float = 1e-4, rtol: float = 0.0,
                seed: int = 0, golden: Optional[dict] = None) -> dict:
    """Verify a multi-prompt folder against ``refs`` ({adapter name: PTuningModel}, in id order); raises
    ``ParityError`` (with ``.report``) on failure, returns the report. Bound: ``atol + rtol x`` the largest
    |reference| of the output (tolerance.py; rtol is fp16's).

    seq-cls and token-cls: the graph's logits have the largest label count; each row is compared on its adapter's
    labels, and the columns after them must hold ``LABEL_PAD`` exactly (export/multi_heads.py).

    ``golden``: a dict to fill with golden.npz's arrays (the batch, each row's reference placed at its real
    positions, the negative control's, the greedy steps), for checks without torch (runtime/golden.py)."""
    from .export.multi_heads import LABEL_PAD

    folder = Path(folder)
    task = manifest["task"]
    output = OUTPUT[task]
    names = list(refs)
    ids_of = {name: entry["id"] for name, entry in manifest["adapters"].items()}
    report: dict = {"passed": False, "atol": atol, "rtol": rtol, "adapters": {}, "max_abs_diff": {}}
    if [ids_of.get(name) for name in names] != list(range(len(names))):
        raise _failure(f"manifest adapters {ids_of} do not map {names} to ids 0..{len(names) - 1}", report)
    if task == "seq2seq-lm":  # two graphs: parity_multi_seq2seq.py, by the same rules
        from .parity_multi_seq2seq import check_multi_seq2seq

        return check_multi_seq2seq(folder, refs, manifest, atol=atol, rtol=rtol, seed=seed, golden=golden)
    graph = _Graph(folder, manifest)
    if "prompt_ids" not in graph.inputs:  # names first
        raise _failure(f"the graph has no prompt_ids input (inputs: {sorted(graph.inputs)})", report)
    vocab = int(manifest["model"]["vocab_size"])
    ids, mask, prompt_ids = _batch(names, vocab, manifest["model"]["padding_side"], seed)
    got = _prefill(graph, task, ids, mask, prompt_ids)[output].astype(np.float32)
    wanted = [_alone(refs[names[p]], ids[r][mask[r] == 1], output) for r, p in enumerate(prompt_ids)]
    width = max(w.shape[-1] for w in wanted)
    if got.shape[0] != ids.shape[0] or (task != "seq-cls" and got.shape[1] != ids.shape[1]) \
            or got.shape[-1] != width:  # then shapes
        raise _failure(f"{output} has shape {list(got.shape)} for input {list(ids.shape)} (last axis: {width})", report)
    padding = [float(np.abs(_real(got[r], mask[r], task)[..., w.shape[-1]:] - LABEL_PAD).max(initial=0.0))
               for r, w in enumerate(wanted)]
    if max(padding) > 0:
        raise _failure(f"label columns past a row's adapter's count are not {LABEL_PAD:g} (off by {max(padding):g})",
                       report)
    if golden is not None:
        golden.update({"case0.input_ids": ids, "case0.attention_mask": mask, "case0.prompt_ids": prompt_ids,
                       f"case0.reference.{output}": _placed(wanted, mask, got.shape, task)})
    scales = {output: max(float(np.abs(w).max()) for w in wanted)}
    for row, prompt in enumerate(prompt_ids):  # then values, per adapter
        want = wanted[row]
        diff = float(np.abs(_real(got[row], mask[row], task)[..., :want.shape[-1]] - want).max())
        entry = report["adapters"].setdefault(names[prompt], {"rows": 0, "max_abs_diff": {}})
        entry["rows"] += 1
        entry["max_abs_diff"][output] = max(entry["max_abs_diff"].get(output, 0.0), diff)
    report["max_abs_diff"][output] = max(e["max_abs_diff"][output] for e in report["adapters"].values())
    if task == "causal-lm":
        tokens, logits = _greedy(graph, ids, mask, prompt_ids, GREEDY_STEPS)
        want_all = []
        equal = True
        for row, prompt in enumerate(prompt_ids):
            row_ids = torch.from_numpy(ids[row][mask[row] == 1][None])
            want_tokens, want_logits = refs[names[prompt]].greedy(row_ids, torch.ones_like(row_ids), GREEDY_STEPS,
                                                                  return_logits=True)
            equal &= bool(np.array_equal(tokens[row], want_tokens[0].numpy()))
            want_all.append((want_tokens[0].numpy(), want_logits[0].float().numpy()))
            diff = float(np.abs(logits[row].astype(np.float32) - want_logits[0].float().numpy()).max())
            entry = report["adapters"][names[prompt]]["max_abs_diff"]
            entry["greedy_logits"] = max(entry.get("greedy_logits", 0.0), diff)
        report["greedy_steps"], report["greedy_tokens_equal"] = GREEDY_STEPS, equal
        scales["greedy_logits"] = max(float(np.abs(lg).max()) for _, lg in want_all)
        if golden is not None:
            golden.update({"greedy.input_ids": ids, "greedy.attention_mask": mask, "greedy.prompt_ids": prompt_ids,
                           "greedy.tokens": np.stack([t for t, _ in want_all]).astype(np.int64),
                           "greedy.reference.logits": np.stack([lg for _, lg in want_all]).astype(np.float32)})
        report["max_abs_diff"]["greedy_logits"] = max(e["max_abs_diff"]["greedy_logits"]
                                                      for e in report["adapters"].values())
    report["scales"] = scales
    report["tolerance"] = {k: atol + rtol * scales[k] for k in report["max_abs_diff"]}
    report["negative_control"] = _negative_control(graph, task, output, refs, names, ids, mask, prompt_ids,
                                                   wanted, report["tolerance"][output], golden)
    over = {k: v for k, v in report["max_abs_diff"].items() if v > report["tolerance"][k]}
    if over or not report.get("greedy_tokens_equal", True):
        worst = ", ".join(f"{k}={v:.3g} (bound {report['tolerance'][k]:.3g})" for k, v in over.items())
        raise _failure(f"a multi-prompt row differs from its adapter alone: max abs diff {worst or 'within bounds'}"
                       + ("" if report.get("greedy_tokens_equal", True) else "; greedy tokens differ"), report)
    if not report["negative_control"]["failed_as_expected"]:
        raise _failure("negative control passed: rows given the wrong prompt still match their adapter, so the "
                       "check cannot see the prompt", report)
    report["passed"] = True
    return report


def _placed(rows: list, mask: np.ndarray, shape, task: str) -> np.ndarray:
    """Per-row outputs of the real positions ((l_r, ...) or, seq-cls, (labels_r,)) placed into a float32 array of
    the graph's ``shape``: zeros on pad positions, ``LABEL_PAD`` in label columns past the row's adapter's count
    (what the graph holds there)."""
    from .export.multi_heads import LABEL_PAD

    out = np.zeros(shape, np.float32)
    for r, value in enumerate(rows):
        width = value.shape[-1]
        target = out[r] if task == "seq-cls" else out[r][mask[r] == 1]
        target[..., :width] = value
        target[..., width:] = LABEL_PAD
        if task == "seq-cls":
            out[r] = target
        else:
            out[r][mask[r] == 1] = target
    return out


def _negative_control(graph, task, output, refs, names, ids, mask, prompt_ids, wanted, bound, golden) -> dict:
    """Every row with ANOTHER adapter's id must miss its own adapter's reference. With a single adapter there is
    no other id: its rows are measured against a perturbed prompt's reference instead.

    golden.npz's control (for the runtime's check) is the other way round, to the same effect: each row's output
    with its own id must miss the reference of the next adapter (or of the perturbed prompt) on that row."""
    if len(names) > 1:
        wrong = (prompt_ids + 1) % len(names)
        got = _prefill(graph, task, ids, mask, wrong)[output].astype(np.float32)
        if golden is not None:
            other = [_alone(refs[names[p]], ids[r][mask[r] == 1], output) for r, p in enumerate(wrong)]
            golden[f"case0.control.{output}"] = _placed(other, mask, got.shape, task)
        how = "each row given the next adapter's prompt id"
    else:
        from .parity import perturbed

        got = _prefill(graph, task, ids, mask, prompt_ids)[output].astype(np.float32)
        control = perturbed(refs[names[0]])
        wanted = [_alone(control, ids[r][mask[r] == 1], output) for r in range(len(ids))]
        if golden is not None:
            golden[f"case0.control.{output}"] = _placed(wanted, mask, got.shape, task)
        how = "rows measured against a perturbed prompt's reference (one adapter: no other id)"
    diffs = [float(np.abs(_real(got[r], mask[r], task)[..., :wanted[r].shape[-1]] - wanted[r]).max())
             for r in range(len(ids))]
    return {"how": how, "min_row_max_abs_diff": min(diffs), "failed_as_expected": min(diffs) > bound}


def _failure(message: str, report: dict) -> ParityError:
    exc = ParityError(message)
    exc.report = report
    return exc


class _AdapterGraphs(Graphs):
    """A multi-prompt folder's graphs seen as adapter ``prompt_id``'s single export: every row takes that prompt,
    and seq-cls/token-cls logits are cut to its ``labels`` (the graph pads them to the largest count). seq2seq-lm:
    the encoder's states lose the ``pad_slots`` in front of that adapter's real prompt slots (its single export's
    shape), and the decoder gets them back as zeros, which its prompt mask hides (export/multi_seq2seq.py)."""

    def __init__(self, folder: Path, manifest: dict, device: str, prompt_id: int, labels: Optional[int],
                 pad_slots: int = 0):
        super().__init__(folder, manifest, device)
        self.prompt_id, self.labels, self.pad_slots = prompt_id, labels, pad_slots

    def run(self, graph: str, feed: dict) -> dict:
        if graph == "decoder_model" and self.pad_slots:
            hidden = feed["encoder_hidden_states"]
            pads = np.zeros((hidden.shape[0], self.pad_slots, hidden.shape[2]), hidden.dtype)
            feed = {**feed, "encoder_hidden_states": np.concatenate([pads, hidden], 1)}
        out = super().run(graph, feed)
        if graph == "encoder_model":
            out["last_hidden_state"] = out["last_hidden_state"][:, self.pad_slots:]
        if self.labels is not None:
            out["logits"] = out["logits"][..., :self.labels]
        return out


def check_quantized_multi(folder: os.PathLike, refs: dict, manifest: dict, *, device: str = "cpu",
                          exact: Optional[dict] = None):
    """The quantized gate (parity_quantized.py) per adapter: adapter k's rows (all given id k) against adapter k's
    reference, with k's own perturbed-prompt control. Returns (report, memo): the report has each adapter's under
    ``adapters`` and, per output, the worst relative error; the memo holds every adapter's cases stacked along the
    batch in id order (labels padded with ``LABEL_PAD``), for golden.npz (export/golden.py, ``adapters=K``).
    Raises ``ParityError`` naming the adapter that failed."""
    from .parity_quantized import check_quantized

    folder = Path(folder)
    names = list(refs)
    labels = {name: (entry.get("num_labels") if manifest["task"] in ("seq-cls", "token-cls") else None)
              for name, entry in manifest["adapters"].items()}
    reports, memos = {}, []
    for k, name in enumerate(names):
        memo = ReferenceMemo()  # one per adapter: the inputs are the same, the references are not
        pad_slots = manifest["num_virtual_tokens"] - refs[name].n if manifest["task"] == "seq2seq-lm" else 0
        graphs = _AdapterGraphs(folder, manifest, device, k, labels[name], pad_slots)
        try:
            reports[name] = check_quantized(folder, refs[name], manifest, device=device, memo=memo, graphs=graphs)
        except ParityError as exc:
            exc.args = (f"adapter {name!r}: {exc.args[0]}",)
            raise
        memos.append(memo)
    worst = {}
    for report in reports.values():
        for key, value in report["relative_error"].items():
            worst[key] = max(worst.get(key, 0.0), value)
    control = {key: min(r["negative_control"]["relative_error"][key] for r in reports.values()) for key in worst}
    report = {"gate": "quantized", "quantize": manifest.get("quantize"), "passed": True, "device": device,
              "rel_limit": next(iter(reports.values()))["rel_limit"], "relative_error": worst,
              "negative_control": {"relative_error": control, "failed_as_expected": True},
              "adapters": reports, "fp32_exact": exact,
              "greedy_steps": next(iter(reports.values())).get("greedy_steps")}
    return report, _stacked(memos)


def _stacked(memos: list):
    """One ReferenceMemo whose entries are the adapters' (same inputs, in the same order) stacked along the batch."""
    from .export.multi_heads import LABEL_PAD

    def cat(values: list) -> np.ndarray:
        width = max(v.shape[-1] for v in values)
        pad = [np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, width - v.shape[-1])], constant_values=LABEL_PAD)
               for v in values]
        return np.concatenate(pad, 0)

    out = ReferenceMemo()
    per = [m.entries("reference", "case") for m in memos]
    for cases in zip(*per, strict=True):
        arrays = [np.concatenate(parts, 0) for parts in zip(*(a for a, _ in cases), strict=True)]
        first = cases[0][0]
        controls = [m.lookup("control", "case", first) for m in memos]
        for role, outs in (("reference", [o for _, o in cases]), ("control", controls)):
            if any(o is None for o in outs):
                continue
            merged = {name: cat([o[name] for o in outs]) for name in outs[0] if name != "present"}
            out.get(role, "case", arrays, lambda merged=merged: merged)
    greedy = [m.entries("reference", "greedy") for m in memos]
    if all(greedy):
        (ids, mask), _ = greedy[0][0]
        tokens = np.concatenate([g[0][1][0] for g in greedy], 0)
        logits = np.concatenate([g[0][1][1] for g in greedy], 0)
        stacked = [np.concatenate([ids] * len(memos), 0), np.concatenate([mask] * len(memos), 0)]
        out.get("reference", "greedy", stacked, lambda: (tokens, logits))
        forced = [m.lookup("control", "forced", [ids, mask, g[0][1][0]]) for m, g in zip(memos, greedy, strict=True)]
        if all(f is not None for f in forced):
            out.get("control", "forced", [*stacked, tokens], lambda: np.concatenate(forced, 0))
    return out


def verify_multi(folder: os.PathLike, manifest: dict, base_model: os.PathLike, *, atol: Optional[float] = None,
                 device: str = "cpu") -> dict:
    """Re-run a multi-prompt folder's parity against PyTorch (``ptuning-verify --reference``): its adapters from the
    paths its manifest recorded, by the gate its export used (exact for fp32/fp16, quantized per adapter)."""
    from .errors import ConfigError
    from .export.multi import load_references
    from .tolerance import default_atol, default_rtol

    if device != "cpu":
        raise ConfigError(f"--device {device}: a multi-prompt folder's reference check runs on the CPU; on a GPU "
                          "host run ptuning-verify DIR --provider cuda (golden.npz)")
    entries = sorted(manifest["adapters"].items(), key=lambda item: item[1]["id"])
    paths = {name: Path(entry["path"]) for name, entry in entries}
    missing = [f"{name} ({path})" for name, path in paths.items() if not path.is_dir()]
    if missing:
        raise ConfigError(f"adapter folders of {folder} not found: {', '.join(missing)}")
    refs, _ = load_references(base_model, paths, manifest["task"])
    if manifest.get("quantize"):
        exact = (manifest.get("parity") or {}).get("fp32_exact")
        return check_quantized_multi(folder, refs, manifest, device=device, exact=exact)[0]
    dtype = manifest.get("dtype", "fp32")
    return check_multi(folder, refs, manifest, atol=default_atol(dtype) if atol is None else atol,
                       rtol=default_rtol(dtype))
