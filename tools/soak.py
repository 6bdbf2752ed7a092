#!/usr/bin/env python
"""Soak one loaded model with many threads: no errors, every answer identical to the serial one, flat memory.

    python tools/soak.py                               # exports tiny GPT-2 (causal-lm) into a temp folder first
    python tools/soak.py --task seq-cls --seconds 60   # tiny BERT sequence classifier
    python tools/soak.py runs/onnx --threads 16        # an exported folder you already have

What it does, in order:
1. builds ``--requests`` random but reproducible (``--seed``) calls of the folder's task, of varying batch and length,
   texts and ``input_ids`` (padded on the side the model needs), greedy and seeded sampling, ``stream`` and a few
   invalid requests (their expected answer is the same ``InputError``);
2. runs each once, serially: the expected answers;
3. warm-up: ``--threads`` threads for ``--warmup`` seconds (thread pools and allocator arenas reach their size);
4. RSS at the start, then ``--threads`` threads for ``--seconds`` seconds, each calling requests picked at random
   and comparing the answer with the serial one bit for bit; RSS at the end (sampled every second in between).

Goals: 0 errors (any exception other than the request's expected one), 0 answers that differ from the serial
answer, RSS at the end within ``--rss-tolerance`` (5%) of the start. Prints a JSON summary; exit 1 when a goal is
missed. The soak process never imports torch: the export, when needed, runs in a child process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# task -> (model folder in models/, PEFT task type, transformers auto class); as tests/conftest.py
TASKS = {
    "causal-lm": ("gpt2", "CAUSAL_LM", "AutoModelForCausalLM"),
    "seq2seq-lm": ("t5", "SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM"),
    "seq-cls": ("bert", "SEQ_CLS", "AutoModelForSequenceClassification"),
    "token-cls": ("bert", "TOKEN_CLS", "AutoModelForTokenClassification"),
    "feature-extraction": ("bert", "FEATURE_EXTRACTION", "AutoModel"),
}
LATENCY_SLOTS = 20_000  # per thread, preallocated: the soak's own bookkeeping must not grow the RSS it measures


# ---------------------------------------------------------------- the exported folder (child process only)

def export_tiny(task: str, model: Optional[str], out: Path, seed: int = 0) -> Path:
    """A P-tuning adapter made by PEFT on a tiny model from models/ (encoder weights perturbed, as the tests do),
    exported with parity checked. Imports torch: called in a child process."""
    import torch
    import transformers
    from peft import PromptEncoderConfig, get_peft_model

    from ptuning_onnx.config import PromptEncoderConfig as Ours
    from ptuning_onnx.export import export

    folder, peft_task, auto_class = TASKS[task]
    base_dir = ROOT / "models" / (model or folder)
    torch.manual_seed(seed)
    kwargs = {"num_labels": 3} if task in ("seq-cls", "token-cls") else {}
    base = getattr(transformers, auto_class).from_pretrained(base_dir, **kwargs)
    sizes = Ours(num_virtual_tokens=5, task_type=peft_task).fill_from_model_config(base.config)
    cfg = PromptEncoderConfig(task_type=peft_task, num_virtual_tokens=5, encoder_hidden_size=32,
                              token_dim=sizes.token_dim, num_attention_heads=sizes.num_attention_heads,
                              num_layers=sizes.num_layers)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(out / "adapter")
    return export(base_dir, out / "adapter", out / "onnx", progress=False).path


def export_in_child(task: str, model: Optional[str], work: Path) -> Path:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import soak; "
            "print(soak.export_tiny(sys.argv[2], sys.argv[3] or None, __import__('pathlib').Path(sys.argv[4])))")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), task, model or "", str(work)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                               "TRANSFORMERS_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"error: exporting a tiny {task} model failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the workload

class Workload:
    """Reproducible requests for one loaded model: ``(name, call)`` pairs, ``call(model)`` -> the answer."""

    def __init__(self, model, seed: int):
        self.model, self.rng = model, np.random.default_rng(seed)
        words = (ROOT / "tools" / "corpus.txt").read_text(encoding="utf-8").split()
        self.words = words
        self.limit = model.max_user_tokens or 256

    def texts(self, n: int) -> list:
        return [" ".join(self.rng.choice(self.words, int(self.rng.integers(1, 24)))) for _ in range(n)]

    def padded(self, rows: int, max_len: int):
        """(ids, mask) int64 (rows, width), rows of random lengths padded on the side the model requires."""
        m = self.model
        lengths = self.rng.integers(1, max_len + 1, rows)
        width = int(lengths.max())
        ids = np.full((rows, width), m.pad_token_id, np.int64)
        mask = np.zeros((rows, width), np.int64)
        left = (m.required_padding or self.rng.choice(["left", "right"])) == "left"
        for r, n in enumerate(lengths):
            cols = slice(width - n, width) if left else slice(0, n)
            ids[r, cols] = self.rng.integers(0, m.vocab_size, n)
            mask[r, cols] = 1
        return ids, mask

    def sampling(self) -> dict:
        if self.rng.random() < 0.5:
            return {}
        return {"do_sample": True, "seed": int(self.rng.integers(0, 2 ** 31)), "top_k": int(self.rng.integers(1, 100)),
                "top_p": float(self.rng.uniform(0.5, 1.0)), "temperature": float(self.rng.uniform(0.5, 1.5)),
                "repetition_penalty": float(self.rng.choice([1.0, 1.3]))}

    def bad(self) -> tuple[str, Callable]:
        """An invalid request: its expected answer is its InputError (same type, same message, every time)."""
        m, kind = self.model, self.rng.integers(4)
        name = {"causal-lm": "generate", "seq2seq-lm": "generate", "seq-cls": "classify",
                "feature-extraction": "embed", "token-cls": "forward"}[m.task]
        if kind == 0:
            ids = [[5, -1 - int(self.rng.integers(100))]]
            mask = None
        elif kind == 1:
            ids, mask = [[5, 6, 7]], [[1, 2, 1]]
        elif kind == 2:
            ids, mask = [[5] * (self.limit + 1)], None
        else:
            ids, mask = np.array([[1.5, 2.0]]), None
        if name == "forward":
            return "bad", lambda mm: mm.forward(ids, mask)
        return "bad", lambda mm: getattr(mm, name)(input_ids=ids, attention_mask=mask)

    def request(self) -> tuple[str, Callable]:
        m, rng = self.model, self.rng
        if rng.random() < 0.08:
            return self.bad()
        has_text = m.tokenizer is not None
        rows = int(rng.integers(1, 5))
        if m.task in ("causal-lm", "seq2seq-lm"):
            new = int(rng.integers(1, 17))
            max_len = max(1, min(48, self.limit - new))
            opts = dict(max_new_tokens=new, **self.sampling())
            kind = rng.choice(["generate-text", "generate-ids", "stream-text", "stream-ids"])
            if kind.endswith("text") and not has_text:
                kind = kind.replace("text", "ids")
            if kind == "generate-text":
                texts = self.texts(rows)
                return kind, lambda mm: mm.generate(texts, **opts)
            if kind == "stream-text":
                text = self.texts(1)[0]
                return kind, lambda mm: list(mm.stream(text, **opts))
            ids, mask = self.padded(1 if kind == "stream-ids" else rows, max_len)
            if kind == "stream-ids":
                return kind, lambda mm: list(mm.stream(input_ids=ids, attention_mask=mask, **opts))
            return kind, lambda mm: mm.generate(input_ids=ids, attention_mask=mask, **opts)
        call = {"seq-cls": "classify", "feature-extraction": "embed", "token-cls": "tag"}[m.task]
        extra = ({"pooling": str(rng.choice(["mean", "cls"])), "normalize": bool(rng.random() < 0.5)}
                 if call == "embed" else {})
        if call == "tag" or (has_text and rng.random() < 0.5):
            texts = self.texts(rows)
            one = texts[0] if rows == 1 and rng.random() < 0.5 else texts  # a single string as well as lists
            return f"{call}-text", lambda mm: getattr(mm, call)(one, **extra)
        ids, mask = self.padded(rows, min(64, self.limit))
        return f"{call}-ids", lambda mm: getattr(mm, call)(input_ids=ids, attention_mask=mask, **extra)


def outcome(model, call: Callable) -> tuple[Any, Optional[str]]:
    """(canonical answer, None), or (canonical InputError, None), or (None, description of any other exception)."""
    from ptuning_onnx.runtime import InputError

    try:
        return canonical(call(model)), None
    except InputError as exc:
        return ("InputError", type(exc).__name__, str(exc)), None
    except Exception as exc:  # the soak counts these: any of them is a failed goal
        return None, f"{type(exc).__name__}: {exc}"


def canonical(value) -> Any:
    """A hashable, bit-exact form of an answer (arrays by dtype, shape and bytes; floats by their bits)."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, dict):
        return tuple(sorted((k, canonical(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(canonical(v) for v in value)
    if isinstance(value, float):
        return ("float", value.hex())
    return value


def rss_bytes() -> int:
    """Resident set size now (Linux /proc); elsewhere the peak from getrusage, which cannot show a fall."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


# ---------------------------------------------------------------- the soak

class Worker(threading.Thread):
    def __init__(self, index: int, model, calls: list, expected: list, seed: int, stop: threading.Event):
        super().__init__(name=f"soak-{index}", daemon=True)
        self.model, self.calls, self.expected, self.stop = model, calls, expected, stop
        self.rng = np.random.default_rng([seed, index])
        self.count = self.mismatches = self.errors = 0
        self.by_kind: dict = {}
        self.examples: list = []
        self.latency = np.zeros(LATENCY_SLOTS)  # a ring: the last LATENCY_SLOTS calls
        self.recording = False

    def run(self) -> None:
        while not self.stop.is_set():
            index = int(self.rng.integers(len(self.calls)))
            kind, call = self.calls[index]
            start = time.perf_counter()
            got, error = outcome(self.model, call)
            elapsed = time.perf_counter() - start
            if not self.recording:
                continue
            self.latency[self.count % LATENCY_SLOTS] = elapsed
            self.count += 1
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            if error is not None:
                self.errors += 1
                self._note(f"request {index} ({kind}): {error}")
            elif got != self.expected[index]:
                self.mismatches += 1
                self._note(f"request {index} ({kind}): answer differs from the serial answer")

    def _note(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text)


def soak(folder: Path, *, seconds: float, threads: int, warmup: float, requests: int, seed: int,
         provider: str, ort_threads: Optional[int], rss_tolerance: float) -> dict:
    import onnxruntime

    from ptuning_onnx import runtime

    model = runtime.load(folder, provider=provider, threads=ort_threads)
    workload = Workload(model, seed)
    calls = [workload.request() for _ in range(requests)]

    t0 = time.perf_counter()
    serial, serial_errors = [], []
    for index, (kind, call) in enumerate(calls):
        got, error = outcome(model, call)
        serial.append(got)
        if error is not None:
            serial_errors.append(f"request {index} ({kind}), serial: {error}")
    serial_s = time.perf_counter() - t0

    stop = threading.Event()
    workers = [Worker(i, model, calls, serial, seed, stop) for i in range(threads)]
    for w in workers:
        w.start()
    time.sleep(warmup)  # pools, arenas and caches reach their working size
    gc.collect()
    rss_start = rss_bytes()
    samples = [rss_start]
    for w in workers:
        w.recording = True
    begin = time.perf_counter()
    deadline = begin + seconds
    while (left := deadline - time.perf_counter()) > 0:
        time.sleep(min(1.0, left))
        samples.append(rss_bytes())
    for w in workers:
        w.recording = False
    elapsed = time.perf_counter() - begin
    stop.set()
    for w in workers:
        w.join()
    gc.collect()
    rss_end = rss_bytes()

    total = sum(w.count for w in workers)
    errors = sum(w.errors for w in workers) + len(serial_errors)
    mismatches = sum(w.mismatches for w in workers)
    latencies = np.concatenate([w.latency[: min(w.count, LATENCY_SLOTS)] for w in workers]) * 1e3
    kinds: dict = {}
    for w in workers:
        for kind, n in w.by_kind.items():
            kinds[kind] = kinds.get(kind, 0) + n
    growth = (rss_end - rss_start) / rss_start
    goals = {"errors": errors == 0, "identical_to_serial": mismatches == 0 and total > 0,
             "rss_flat": abs(growth) <= rss_tolerance}
    mb = 1 / 2 ** 20
    return {
        "folder": str(folder), "task": model.task, "providers": model.providers, "onnxruntime": onnxruntime.__version__,
        "threads": threads, "seconds": round(elapsed, 1), "warmup_s": warmup, "distinct_requests": len(calls),
        "serial_pass_s": round(serial_s, 2),
        "expected_input_errors": sum(1 for s in serial if isinstance(s, tuple) and s[:1] == ("InputError",)),
        "requests": total, "requests_per_s": round(total / elapsed, 1), "by_kind": dict(sorted(kinds.items())),
        "latency_ms": {q: round(float(np.percentile(latencies, p)), 2) for q, p in
                       (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))} if total else {},
        "errors": errors, "mismatches": mismatches,
        "error_examples": (serial_errors + [e for w in workers for e in w.examples])[:10],
        "rss_start_mb": round(rss_start * mb, 1), "rss_end_mb": round(rss_end * mb, 1),
        "rss_min_mb": round(min(samples) * mb, 1), "rss_max_mb": round(max(samples) * mb, 1),
        "rss_growth_pct": round(growth * 100, 2), "rss_tolerance_pct": rss_tolerance * 100,
        "torch_imported": "torch" in sys.modules,
        "goals": goals, "passed": all(goals.values()),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", nargs="?", type=Path, help="exported folder; default: export a tiny model of --task")
    p.add_argument("--task", choices=sorted(TASKS), default="causal-lm", help="when no folder is given")
    p.add_argument("--model", help="models/ folder to export instead of the task's default (e.g. llama)")
    p.add_argument("--seconds", type=float, default=60.0, help="measured soak (default: %(default)s)")
    p.add_argument("--threads", type=int, default=16, help="concurrent callers (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=5.0, help="concurrent warm-up before RSS start (s)")
    p.add_argument("--requests", type=int, default=96, help="distinct requests (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--provider", default="cpu", help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--ort-threads", type=int, help="onnxruntime intra-op threads per session")
    p.add_argument("--rss-tolerance", type=float, default=0.05, help="allowed RSS change (default: 0.05 = 5%%)")
    p.add_argument("--output", type=Path, help="also write the JSON summary here")
    return p


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads < 1 or args.seconds <= 0 or args.requests < 1 or args.warmup < 0:
        raise SystemExit("error: --threads and --requests must be >= 1, --seconds > 0, --warmup >= 0")
    with tempfile.TemporaryDirectory(prefix="ptuning-soak-") as work:
        folder = args.folder or export_in_child(args.task, args.model, Path(work))
        summary = soak(folder, seconds=args.seconds, threads=args.threads, warmup=args.warmup,
                       requests=args.requests, seed=args.seed, provider=args.provider, ort_threads=args.ort_threads,
                       rss_tolerance=args.rss_tolerance)
    if args.folder is None:
        summary["folder"] = f"(temporary) tiny {args.model or TASKS[args.task][0]} {args.task} export"
    text = json.dumps(summary, indent=2, sort_keys=True)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
