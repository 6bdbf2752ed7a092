"""How each contender loads and runs. Used inside a worker process, one contender per process.

Every runner offers ``generate(ids, n) -> (tokens (B, n), first_s, total_s)`` for causal LMs and
``classify(ids, mask) -> logits (B, labels)`` for seq-cls. ``first_s`` is when the first new token was known
(time to first token), ``total_s`` when the n-th was; both from the call's start, in seconds. Each contender is
asked for exactly n greedy tokens (EOS never ends a row early), the way its users would ask:

- ``peft``: ``PeftModel.generate`` (transformers' greedy loop, ``min_new_tokens=n``) / ``PeftModel(...)``;
- ``optimum``: ``ORTModelForCausalLM.generate`` / ``ORTModelForSequenceClassification(...)`` on optimum's export of
  the base model (no prompt);
- ``genai-*``: onnxruntime-genai's ``Generator`` on its model builder's export of the base (no prompt), ids fed
  with ``append_tokens``;
- ``ours-*``: ``ptuning_onnx.runtime.load(...).generate(...)`` / ``.classify(...)``.

Threads: torch's ``set_num_threads`` and every onnxruntime session's ``intra_op_num_threads`` (genai's through its
``genai_config.json``) are the same number.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np


class _TimingStreamer:
    """transformers calls ``put`` once with the prompt, then once per new token: the second call is the first token."""

    def __init__(self, start: float):
        self.start, self.calls, self.first = start, 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def _greedy_hf(model, ids: np.ndarray, n: int, pad: int):
    import torch
    from transformers.generation.streamers import BaseStreamer

    streamer_cls = type("Streamer", (_TimingStreamer, BaseStreamer), {})
    start = time.perf_counter()
    streamer = streamer_cls(start)
    tokens = torch.from_numpy(ids)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=pad, streamer=streamer)
    end = time.perf_counter()
    return out[:, ids.shape[1]:].numpy(), streamer.first - start, end - start


def _pad_id(config) -> int:
    for value in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


class PeftRunner:
    def __init__(self, paths: dict, task: str, threads: int):
        import torch
        import transformers
        from peft import PeftModel

        torch.set_num_threads(threads)
        auto = transformers.AutoModelForCausalLM if task == "causal-lm" else \
            transformers.AutoModelForSequenceClassification
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = auto.from_pretrained(paths["base"], **({"num_labels": paths["num_labels"]}
                                                          if task == "seq-cls" else {}))
            self.model = PeftModel.from_pretrained(base, paths["adapter"]).eval()
        self.pad = _pad_id(base.config)

    def generate(self, ids, n):
        return _greedy_hf(self.model, ids, n, self.pad)

    def classify(self, ids, mask):
        import torch

        with torch.inference_mode():
            return self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


class OptimumRunner:
    def __init__(self, paths: dict, task: str, threads: int):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForSequenceClassification

        torch.set_num_threads(threads)  # optimum's generate() runs its token choice in torch
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        cls = ORTModelForCausalLM if task == "causal-lm" else ORTModelForSequenceClassification
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = cls.from_pretrained(paths["folder"], session_options=options,
                                             provider="CPUExecutionProvider")
        self.pad = _pad_id(self.model.config)

    def generate(self, ids, n):
        return _greedy_hf(self.model, ids, n, self.pad)

    def classify(self, ids, mask):
        import torch

        extra = {}
        if "token_type_ids" in self.model.input_names:
            extra["token_type_ids"] = torch.zeros(ids.shape, dtype=torch.int64)
        with torch.inference_mode():
            return self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                              **extra).logits.numpy()


def set_genai_threads(folder: Path, threads: int) -> None:
    """genai reads its sessions' options from ``genai_config.json`` only."""
    path = Path(folder) / "genai_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != threads:
        options["intra_op_num_threads"] = threads
        path.write_text(json.dumps(config, indent=4), encoding="utf-8")


class GenaiRunner:
    def __init__(self, paths: dict, task: str, threads: int):
        import onnxruntime_genai as og

        set_genai_threads(paths["folder"], threads)
        self.og, self.model = og, og.Model(str(paths["folder"]))

    def generate(self, ids, n):
        og = self.og
        batch, length = ids.shape
        start = time.perf_counter()
        params = og.GeneratorParams(self.model)
        # min_length = max_length: EOS is masked until n tokens are out, as min_new_tokens does for transformers.
        params.set_search_options(max_length=length + n, min_length=length + n, batch_size=batch, do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids.astype(np.int32))  # the prefill runs here
        tokens, first = np.empty((batch, n), np.int64), None
        for step in range(n):
            generator.generate_next_token()  # picks from the last logits, then runs the model for the next step
            tokens[:, step] = generator.get_next_tokens()
            if first is None:
                first = time.perf_counter()
        return tokens, first - start, time.perf_counter() - start


class _FirstRunClock:
    """Stands in for an onnxruntime session and notes when its first ``run*`` call returned: the prefill, whose
    logits give the first token. This times ``generate()`` as users call it, whatever loop the runtime uses."""

    def __init__(self, session):
        self._session, self.first = session, None

    def __getattr__(self, name):
        attr = getattr(self._session, name)
        if not (name.startswith("run") and callable(attr)):
            return attr

        def timed(*args, **kwargs):
            out = attr(*args, **kwargs)
            if self.first is None:
                self.first = time.perf_counter()
            return out

        return timed


class OursRunner:
    def __init__(self, paths: dict, task: str, threads: int):
        from .. import runtime

        self.model = runtime.load(paths["folder"], provider="cpu", threads=threads)
        if task == "causal-lm":
            self.clock = _FirstRunClock(self.model.sessions["model"])
            self.model.sessions["model"] = self.clock

    def generate(self, ids, n):
        self.clock.first = None
        start = time.perf_counter()
        tokens = self.model.generate(input_ids=ids, max_new_tokens=n, eos_token_id=[])
        end = time.perf_counter()
        return tokens, self.clock.first - start, end - start

    def classify(self, ids, mask):
        rows = self.model.classify(input_ids=ids, attention_mask=mask)
        return np.array([row["logits"] for row in rows], np.float32)


RUNNERS = {"peft": PeftRunner, "optimum": OptimumRunner, "genai": GenaiRunner, "ours": OursRunner}


def runner_for(contender: str, paths: dict, task: str, threads: int):
    return RUNNERS[contender.split("-")[0]](paths, task, threads)


# ---------------------------------------------------------------- cold start: import + load in a fresh process

_COLD = {
    "peft": ("import transformers, peft",
             "base = transformers.{auto}.from_pretrained({base!r}{labels}); "
             "peft.PeftModel.from_pretrained(base, {adapter!r}).eval()"),
    "optimum": ("import onnxruntime as ort; from optimum.onnxruntime import {ort_cls}",
                "o = ort.SessionOptions(); o.intra_op_num_threads = {threads}; "
                "{ort_cls}.from_pretrained({folder!r}, session_options=o, provider='CPUExecutionProvider')"),
    "genai": ("import onnxruntime_genai as og", "og.Model({folder!r})"),
    "ours": ("import ptuning_onnx.runtime as rt", "rt.load({folder!r}, provider='cpu', threads={threads})"),
}


def cold_start_code(contender: str, paths: dict, task: str, threads: int) -> str:
    """Python source that imports and loads ``contender`` and prints JSON: import_ms, load_ms, peak_rss_mb."""
    kind = contender.split("-")[0]
    causal = task == "causal-lm"
    fields = dict(paths, threads=threads, auto="AutoModelForCausalLM" if causal else
                  "AutoModelForSequenceClassification", labels="" if causal else
                  f", num_labels={paths.get('num_labels')}", ort_cls="ORTModelForCausalLM" if causal else
                  "ORTModelForSequenceClassification")
    imports, load = (part.format(**fields) for part in _COLD[kind])
    if kind in ("peft", "optimum"):
        imports = f"import torch; torch.set_num_threads({threads}); {imports}"
    return "\n".join([
        "import json, time, warnings; warnings.simplefilter('ignore'); t0 = time.perf_counter()",
        imports, "t1 = time.perf_counter()", load, "t2 = time.perf_counter()",
        "from ptuning_onnx.bench.worker import peak_rss_mb",
        "print(json.dumps({'import_ms': (t1 - t0) * 1e3, 'load_ms': (t2 - t1) * 1e3, 'peak_rss_mb': peak_rss_mb()}))"])
