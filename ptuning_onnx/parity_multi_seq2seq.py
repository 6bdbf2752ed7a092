"""Parity of a multi-prompt seq2seq-lm folder (T5, BART): parity_multi.py's check, through two graphs.

ONE mixed, right-padded batch (two rows per adapter, parity_multi's ``_batch``) goes through the encoder graph
and then the decoder graph, teacher-forced on ``DECODER_STEPS`` decoder tokens; each row is compared with the
PyTorch reference of ITS adapter run on that row alone, unpadded: the encoder's user rows and the decoder's logits
(names, then shapes, then values). Then ``GREEDY_STEPS`` greedy steps through the decoder's cache in the mixed
batch: tokens must equal each row's reference alone. Negative control: every row given the next adapter's id (or,
with one adapter, measured against a perturbed prompt) must miss its own reference's logits by more than the bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import manifest as mf
from .parity_multi import GREEDY_STEPS, _batch, _failure, _placed
from .runtime import generation as gen

DECODER_STEPS = 3  # as the single export's golden case (FORMAT.md)


class _Graphs:
    def __init__(self, folder: Path, manifest: dict):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.sessions = {name: ort.InferenceSession(str(mf.graph_path(folder, manifest, name)), options,
                                                    providers=["CPUExecutionProvider"])
                         for name in ("encoder_model", "decoder_model")}

    def inputs(self, name: str) -> set:
        return {i.name for i in self.sessions[name].get_inputs()}

    def encode(self, ids, mask, prompt_ids) -> np.ndarray:
        feed = {"input_ids": ids, "attention_mask": mask, "prompt_ids": prompt_ids}
        return self.sessions["encoder_model"].run(["last_hidden_state"], feed)[0]  # (B, N+S, D)

    def decode(self, dec, mask, hidden, prompt_ids, past: Optional[dict] = None) -> dict:
        session = self.sessions["decoder_model"]
        feed = {"input_ids": dec, "encoder_attention_mask": mask, "encoder_hidden_states": hidden,
                "prompt_ids": prompt_ids, **(past if past is not None else gen.empty_past(session, dec.shape[0]))}
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))

    def greedy(self, ids, mask, prompt_ids, start: int, steps: int):
        """(tokens (B, steps), logits (B, steps, V)) through the decoder's cache, the whole batch at once."""
        hidden = self.encode(ids, mask, prompt_ids)
        token = np.full((ids.shape[0], 1), start, np.int64)
        past, tokens, logits = None, [], []
        for _ in range(steps):
            out = self.decode(token, mask, hidden, prompt_ids, past)
            logits.append(out["logits"][:, -1].astype(np.float32))
            token = logits[-1].argmax(-1)[:, None].astype(np.int64)
            tokens.append(token)
            past = {name.replace("present", "past_key_values", 1): value for name, value in out.items()
                    if name.startswith("present.")}
        return np.concatenate(tokens, 1), np.stack(logits, 1)


@torch.no_grad()
def _alone(ref, ids_row: np.ndarray, dec_row: np.ndarray) -> tuple:
    """The reference on one unpadded row: (encoder user rows (l, D), logits (T, V))."""
    row = torch.from_numpy(ids_row[None])
    out = ref(row, torch.ones_like(row), decoder_input_ids=torch.from_numpy(dec_row[None]))
    return out.encoder_last_hidden_state[0].float().numpy(), out.logits[0].float().numpy()


def check_multi_seq2seq(folder: Path, refs: dict, manifest: dict, *, atol: float, rtol: float, seed: int,
                        golden: Optional[dict]) -> dict:
    """parity_multi.check_multi for seq2seq-lm; same arguments, report and errors."""
    names = list(refs)
    report: dict = {"passed": False, "atol": atol, "rtol": rtol, "adapters": {}, "max_abs_diff": {}}
    graphs = _Graphs(folder, manifest)
    for graph in ("encoder_model", "decoder_model"):  # names first
        if "prompt_ids" not in graphs.inputs(graph):
            raise _failure(f"{graph} has no prompt_ids input (inputs: {sorted(graphs.inputs(graph))})", report)
    vocab = int(manifest["model"]["vocab_size"])
    start = manifest["model"].get("decoder_start_token_id")
    start = int(start if start is not None else refs[names[0]].base.config.decoder_start_token_id)
    ids, mask, prompt_ids = _batch(names, vocab, "right", seed)
    rng = np.random.default_rng(seed + 1)
    dec = np.concatenate([np.full((len(ids), 1), start, np.int64),
                          rng.integers(0, vocab, (len(ids), DECODER_STEPS - 1), dtype=np.int64)], 1)
    hidden = graphs.encode(ids, mask, prompt_ids)
    logits = graphs.decode(dec, mask, hidden, prompt_ids)["logits"].astype(np.float32)
    n = hidden.shape[1] - ids.shape[1]  # N: the graph's prompt slots
    wanted = [_alone(refs[names[p]], ids[r][mask[r] == 1], dec[r]) for r, p in enumerate(prompt_ids)]
    if n < max(ref.n for ref in refs.values()) or logits.shape[:2] != dec.shape \
            or logits.shape[2] != wanted[0][1].shape[-1]:  # then shapes
        raise _failure(f"last_hidden_state {list(hidden.shape)} / logits {list(logits.shape)} for input "
                       f"{list(ids.shape)} and decoder input {list(dec.shape)}", report)
    got = {"last_hidden_state": [hidden[r, n:][mask[r] == 1].astype(np.float32) for r in range(len(ids))],
           "logits": list(logits)}
    for row, prompt in enumerate(prompt_ids):  # then values, per adapter
        entry = report["adapters"].setdefault(names[prompt], {"rows": 0, "max_abs_diff": {}})
        entry["rows"] += 1
        for k, output in enumerate(("last_hidden_state", "logits")):
            diff = float(np.abs(got[output][row] - wanted[row][k]).max())
            entry["max_abs_diff"][output] = max(entry["max_abs_diff"].get(output, 0.0), diff)
    tokens, greedy_logits = graphs.greedy(ids, mask, prompt_ids, start, GREEDY_STEPS)
    equal, want_greedy = True, []
    for row, prompt in enumerate(prompt_ids):
        row_ids = torch.from_numpy(ids[row][mask[row] == 1][None])
        want_tokens, want_logits = refs[names[prompt]].greedy(row_ids, torch.ones_like(row_ids), GREEDY_STEPS,
                                                              return_logits=True)
        want_greedy.append((want_tokens[0].numpy(), want_logits[0].float().numpy()))
        equal &= bool(np.array_equal(tokens[row], want_greedy[-1][0]))
        entry = report["adapters"][names[prompt]]["max_abs_diff"]
        diff = float(np.abs(greedy_logits[row] - want_greedy[-1][1]).max())
        entry["greedy_logits"] = max(entry.get("greedy_logits", 0.0), diff)
    report["greedy_steps"], report["greedy_tokens_equal"] = GREEDY_STEPS, equal
    for key in ("last_hidden_state", "logits", "greedy_logits"):
        report["max_abs_diff"][key] = max(e["max_abs_diff"][key] for e in report["adapters"].values())
    scales = {"last_hidden_state": max(float(np.abs(w[0]).max()) for w in wanted),
              "logits": max(float(np.abs(w[1]).max()) for w in wanted),
              "greedy_logits": max(float(np.abs(lg).max()) for _, lg in want_greedy)}
    report["scales"] = scales
    report["tolerance"] = {k: atol + rtol * scales[k] for k in report["max_abs_diff"]}
    if golden is not None:
        golden.update({"case0.input_ids": ids, "case0.attention_mask": mask, "case0.prompt_ids": prompt_ids,
                       "case0.decoder_input_ids": dec,
                       "case0.reference.last_hidden_state": _placed([w[0] for w in wanted], mask,
                                                                    (*ids.shape, hidden.shape[2]), "token-cls"),
                       "case0.reference.logits": np.stack([w[1] for w in wanted]).astype(np.float32),
                       "greedy.input_ids": ids, "greedy.attention_mask": mask, "greedy.prompt_ids": prompt_ids,
                       "greedy.tokens": np.stack([t for t, _ in want_greedy]).astype(np.int64),
                       "greedy.reference.logits": np.stack([lg for _, lg in want_greedy]).astype(np.float32)})
    report["negative_control"] = _negative_control(graphs, refs, names, ids, mask, dec, prompt_ids, wanted,
                                                   report["tolerance"]["logits"], golden)
    over = {k: v for k, v in report["max_abs_diff"].items() if v > report["tolerance"][k]}
    if over or not equal:
        worst = ", ".join(f"{k}={v:.3g} (bound {report['tolerance'][k]:.3g})" for k, v in over.items())
        raise _failure(f"a multi-prompt row differs from its adapter alone: max abs diff {worst or 'within bounds'}"
                       + ("" if equal else "; greedy tokens differ"), report)
    if not report["negative_control"]["failed_as_expected"]:
        raise _failure("negative control passed: rows given the wrong prompt still match their adapter, so the "
                       "check cannot see the prompt", report)
    report["passed"] = True
    return report


def _negative_control(graphs, refs, names, ids, mask, dec, prompt_ids, wanted, bound, golden) -> dict:
    """parity_multi's control on the decoder's logits: each row given the next adapter's id must miss its own
    reference (one adapter: its rows against a perturbed prompt's reference). golden.npz's control is the other
    way round (each row with its own id must miss the next adapter's reference), to the same effect."""
    if len(names) > 1:
        wrong = (prompt_ids + 1) % len(names)
        got = graphs.decode(dec, mask, graphs.encode(ids, mask, wrong), wrong)["logits"].astype(np.float32)
        if golden is not None:
            other = [_alone(refs[names[p]], ids[r][mask[r] == 1], dec[r])[1] for r, p in enumerate(wrong)]
            golden["case0.control.logits"] = np.stack(other).astype(np.float32)
        how = "each row given the next adapter's prompt id"
    else:
        from .parity import perturbed

        got = graphs.decode(dec, mask, graphs.encode(ids, mask, prompt_ids), prompt_ids)["logits"]
        control = perturbed(refs[names[0]])
        wanted = [_alone(control, ids[r][mask[r] == 1], dec[r]) for r in range(len(ids))]
        if golden is not None:
            golden["case0.control.logits"] = np.stack([w[1] for w in wanted]).astype(np.float32)
        how = "rows measured against a perturbed prompt's reference (one adapter: no other id)"
    diffs = [float(np.abs(got[r] - wanted[r][1]).max()) for r in range(len(ids))]
    return {"how": how, "min_row_max_abs_diff": min(diffs), "failed_as_expected": min(diffs) > bound}
