"""The ONNX side of parity: the folder's graphs in onnxruntime, the random cases they run on, one forward per case,
greedy or teacher-forced decoding through the KV cache, and the declared names. parity.py holds them against the
PyTorch reference; parity_quantized.py and export/fusion.py run them too. Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from . import manifest as mf
from .config import TaskType
from .errors import ParityError
from .tolerance import MaxDiffs

BATCHES, LENGTHS, GREEDY_STEPS = (1, 3), (1, 7, 33), 16


class Graphs:
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


def random_cases(vocab: int, limit: Optional[int], padding_side: str, seed: int):
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


def positions(mask: np.ndarray) -> np.ndarray:
    return np.clip(np.cumsum(mask, -1) - 1, 0, None)


def run_case(graphs: Graphs, task: TaskType, ids, mask, dec_ids=None) -> tuple:
    """One (ids, mask) batch through onnxruntime: returns (case, outputs)."""
    batch = ids.shape[0]
    if task == TaskType.CAUSAL_LM:
        feed = graphs.only_inputs("model", {"input_ids": ids, "attention_mask": mask,
                                            "position_ids": positions(mask), **graphs.empty_past("model", batch)})
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


def run_outputs(graphs: Graphs, manifest: dict, task: TaskType, seed: int, batches=BATCHES):
    """Run every case (of the given batch sizes) through onnxruntime once; returns [(case, onnx outputs)]. The
    cases are drawn in the same order whatever ``batches`` keeps, so a subset has the same inputs."""
    cfg = manifest["model"]
    vocab, limit = cfg["vocab_size"], cfg["max_user_tokens"]
    results = []
    cases = random_cases(vocab, None if limit is None else limit - GREEDY_STEPS, cfg["padding_side"], seed)
    if manifest.get("template"):  # inline virtual slots: placeholder ids in the inputs (parity_template.py)
        from .parity_template import template_cases

        cases = template_cases(manifest["template"], vocab, None if limit is None else limit - GREEDY_STEPS,
                               cfg["padding_side"], seed, BATCHES, LENGTHS)
    for ids, mask in cases:
        dec_ids = np.random.default_rng(seed + 1).integers(0, vocab, size=(ids.shape[0], 3), dtype=np.int64)
        if ids.shape[0] in batches:
            results.append(run_case(graphs, task, ids, mask, dec_ids))
    return results


def padding_invariance(graphs: Graphs, task: TaskType, runs, diffs: MaxDiffs) -> None:
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
            _, alone = run_case(graphs, task, ids[row:row + 1, real], mask[row:row + 1, real], dec)
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


def greedy_onnx(graphs: Graphs, manifest: dict, task: TaskType, ids, mask, steps: int, forced=None):
    """Decode in onnxruntime through the KV cache; returns (tokens (B, steps), logits (B, steps, V)).

    Greedy, or teacher-forced along ``forced`` (B, steps): each step then feeds ``forced``'s token, not its own."""
    batch = ids.shape[0]
    tokens, logits = [], []

    def choose(step: int, last: np.ndarray) -> np.ndarray:
        token = last.argmax(-1)[:, None].astype(np.int64) if forced is None else forced[:, step:step + 1]
        tokens.append(token), logits.append(last)
        return token

    if task == TaskType.CAUSAL_LM:
        feed = graphs.only_inputs("model", {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask),
                                            "logits_to_keep": np.array(1, np.int64),
                                            **graphs.empty_past("model", batch)})
        past_names = graphs.past_names("model")
        for step in range(steps):
            out = graphs.run("model", feed)
            token = choose(step, out["logits"][:, -1])
            mask = np.concatenate([mask, np.ones_like(token)], 1)
            feed = graphs.only_inputs("model", {"input_ids": token, "attention_mask": mask,
                                                "position_ids": positions(mask)[:, -1:],
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


def check_names(graphs: Graphs, manifest: dict) -> list:
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
