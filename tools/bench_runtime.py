#!/usr/bin/env python
"""Benchmark the torch-free runtime side by side with its baselines, in one run; prints a markdown table.

The comparison with the other ways to run a model (PEFT, optimum, onnxruntime-genai; int8/int4) and issue 8's
goals is ``ptuning-bench`` (ptuning_onnx/bench/; ratios there are ours / theirs). This tool stays for the
runtime's own diagnostics, which ptuning-bench does not cover: its Python overhead against a bare ``session.run``
loop, ``logits_to_keep``, and CUDA / fp16 runs on a GPU machine.

    python tools/bench_runtime.py                      # tiny GPT-2 from models/ (seconds)
    python tools/bench_runtime.py --model-size small   # GPT-2-small shape (768 x 12 layers), random weights (~2 min)
    python tools/bench_runtime.py --provider cuda --dtype fp16 --skip-peft

Rows (medians over --repeats; ratio = baseline / ours, > 1 means ours is faster):
  (a) greedy generation of exactly --new-tokens: our ``generate`` (``eos_token_id=[]``) vs PEFT's ``generate``
      (``min_new_tokens``; same adapter), and vs a minimal hand-written ``session.run`` loop (our Python overhead);
  (b) prefill: ``logits_to_keep=1`` vs every position's logits (the graph's default);
  (c) cold start: ``import ptuning_onnx.runtime`` + ``load()`` in a fresh process (sha256 check included).
Each side runs in its own worker process, timed in turn. Everything is written under a temporary folder (or --work).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def build_base(size: str, work: Path) -> Path:
    """tiny: models/gpt2. small: a random GPT-2-small-shaped model (n_embd 768, 12 layers, vocab 50257)."""
    if size == "tiny":
        return ROOT / "models" / "gpt2"
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    base = work / "gpt2-small"
    if (base / "config.json").is_file():
        return base
    torch.manual_seed(0)
    config = GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257, bos_token_id=0,
                        eos_token_id=0, pad_token_id=1)
    GPT2LMHeadModel(config).eval().save_pretrained(base, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(ROOT / "models" / "gpt2" / name, base / name)  # ids < 1000 only; the benchmark feeds ids
    return base


def build_export(base: Path, work: Path, num_virtual_tokens: int, dtype: str, device: str) -> Path:
    import torch
    from peft import PromptEncoderConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ptuning_onnx.export import export

    adapter = work / "adapter"
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                              encoder_hidden_size=128))
    with torch.no_grad():
        for p in peft.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.eval().save_pretrained(adapter)
    start = time.perf_counter()
    folder = export(base, adapter, work / "export", dtype=dtype, device=device, progress=False).path
    print(f"[bench] exported {base.name} ({dtype}) in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return folder


def numpy_loop(session, ids, new_tokens: int):
    """A minimal hand-written greedy loop over ``session.run`` (no validation, no processors): the floor that
    shows what our ``generate`` adds in Python."""
    from ptuning_onnx.runtime.generation import empty_past

    mask = np.ones_like(ids)
    names = [o.name for o in session.get_outputs()]
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.cumsum(mask, -1) - 1,
            "logits_to_keep": np.array(1, np.int64), **empty_past(session, ids.shape[0])}
    past = [n for n in feed if n.startswith("past_key_values.")]
    out_tokens = []
    for _ in range(new_tokens):
        out = dict(zip(names, session.run(None, feed), strict=True))
        token = out["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        out_tokens.append(token)
        mask = np.concatenate([mask, np.ones_like(token)], 1)
        feed = {"input_ids": token, "attention_mask": mask, "position_ids": mask.sum(-1, keepdims=True) - 1,
                "logits_to_keep": np.array(1, np.int64), **{n: out[n.replace("past_key_values", "present")]
                                                            for n in past}}
    return np.concatenate(out_tokens, 1)


# ---------------------------------------------------------------- workers: one process per side
# torch and onnxruntime are never timed in one process: after torch's OpenMP threads have run, onnxruntime CPU
# calls in the same process were measured 2x slower (500 -> 1100 ms, GPT-2-small, 2 cores). Each side runs in its
# own worker, and the main process asks them in turn (A, B, A, B, ...) so that load from other processes on the
# machine hits both sides alike.

def runtime_jobs(args) -> dict:
    from ptuning_onnx import runtime as rt
    from ptuning_onnx.runtime.generation import empty_past, positions
    from ptuning_onnx.runtime.session import GraphRunner

    model = rt.load(args.folder, provider=args.provider, threads=args.threads)
    session, n, ids = model.sessions["model"], args.new_tokens, prompt_ids(args)
    mask = np.ones_like(ids)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask),
            **empty_past(session, args.batch)}

    def prefill(keep):
        # A fresh runner per call, as generate() makes one; on CUDA it binds the logits back to the host.
        extra = {"logits_to_keep": np.array(1, np.int64)} if keep else {}
        return GraphRunner(session, model.device, model.device_id).run({**feed, **extra})

    jobs = {
        "ours": lambda: model.generate(input_ids=ids, max_new_tokens=n, eos_token_id=[]),
        "prefill_keep1": lambda: prefill(True),
        "prefill_full": lambda: prefill(False),
        "info": lambda: {"providers": model.providers["model"], "vocab": model.vocab_size},
    }
    if model.device == "cpu":
        jobs["loop"] = lambda: numpy_loop(session, ids, n)
    return jobs


def peft_jobs(args) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.provider.startswith("cuda") and torch.cuda.is_available() else "cpu"
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.base), args.adapter).eval().to(device)
    ids = torch.from_numpy(prompt_ids(args)).to(device)
    gen_cfg = peft.base_model.generation_config
    pad = next((v for v in (gen_cfg.pad_token_id, gen_cfg.eos_token_id, 0) if v is not None))

    def generate():
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
        if device == "cuda":
            torch.cuda.synchronize()
        return out[:, ids.shape[1]:].cpu().numpy()

    return {"peft": generate, "info": lambda: {"device": device}}


def prompt_ids(args) -> np.ndarray:
    return np.random.default_rng(0).integers(2, 1000, size=(args.batch, args.prompt_tokens), dtype=np.int64)


def worker(args) -> int:
    """Line protocol on stdin/stdout: a job name -> its wall time in ms; ``=name`` -> its result as JSON."""
    jobs = runtime_jobs(args) if args.worker == "runtime" else peft_jobs(args)
    print(json.dumps(sorted(jobs)), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name.startswith("="):
            result = jobs[name[1:]]()
            print(json.dumps(result.tolist() if isinstance(result, np.ndarray) else result), flush=True)
            continue
        start = time.perf_counter()
        jobs[name]()
        print(f"{(time.perf_counter() - start) * 1e3:.3f}", flush=True)
    return 0


class Worker:
    def __init__(self, kind: str, args, extra: list):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--provider", args.provider,
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--batch", str(args.batch)] + (["--threads", str(args.threads)] if args.threads else []) + extra
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{kind} worker failed to start: {' '.join(cmd)}")
        self.jobs = json.loads(line)

    def time(self, job: str) -> float:
        self.proc.stdin.write(job + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def result(self, job: str):
        self.proc.stdin.write("=" + job + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def interleaved(calls: list, repeats: int) -> list:
    """``calls``: [(worker, job)]; one warm-up each, then ``repeats`` rounds in turn; medians in ms.

    A pause follows each call: OpenMP threads (torch's) keep spinning for up to 200 ms after their work, which
    would slow whichever call comes next on a small machine.
    """
    for w, job in calls:
        w.time(job)
    times = [[] for _ in calls]
    for _ in range(repeats):
        for i, (w, job) in enumerate(calls):
            time.sleep(0.3)
            times[i].append(w.time(job))
    return [statistics.median(t) for t in times]


def cold_start(folder: Path, provider: str, repeats: int) -> tuple[float, float]:
    code = ("import time; t0 = time.perf_counter()\n"
            "import ptuning_onnx.runtime as rt; t1 = time.perf_counter()\n"
            f"rt.load({str(folder)!r}, provider={provider!r}); t2 = time.perf_counter()\n"
            "print(t1 - t0, t2 - t1)")
    imports, loads = [], []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
        a, b = map(float, out.stdout.split())
        imports.append(a * 1e3), loads.append(b * 1e3)
    return statistics.median(imports), statistics.median(loads)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-size", choices=["tiny", "small"], default="tiny")
    p.add_argument("--provider", default="cpu", help="runtime provider: cpu, cuda, auto (default: cpu)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="exported graphs (fp16: CUDA)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--num-virtual-tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads, both sides (default: all cores)")
    p.add_argument("--skip-peft", action="store_true", help="no PyTorch baseline")
    p.add_argument("--work", type=Path, help="keep the built model/export here instead of a temporary folder")
    p.add_argument("--worker", choices=["runtime", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> int:
    base = build_base(args.model_size, work)
    if not (work / "export" / "ptuning_onnx.json").is_file():
        build_export(base, work, args.num_virtual_tokens, args.dtype,
                     "cuda" if args.provider.startswith("cuda") else "cpu")
    folder = work / "export"
    load_before = os.getloadavg()[0]
    imp, load = cold_start(folder, args.provider, 3)
    ours = Worker("runtime", args, ["--folder", str(folder)])
    workers = [ours]
    try:
        info = ours.result("info")
        rows = []
        n = args.new_tokens
        calls = [(ours, "ours")]
        if "loop" in ours.jobs:
            calls.append((ours, "loop"))
        if not args.skip_peft:
            peft = Worker("peft", args, ["--base", str(base), "--adapter", str(work / "adapter")])
            workers.append(peft)
            calls.append((peft, "peft"))
        medians = interleaved(calls, args.repeats)
        ours_tokens = ours.result("ours")
        if "loop" in ours.jobs:
            same = ours.result("loop") == ours_tokens
            rows.append((f"greedy {n} new tokens vs a minimal hand-written `session.run` loop", medians[0],
                         medians[1], "tokens equal" if same else "TOKENS DIFFER"))
        if not args.skip_peft:
            same = peft.result("peft") == ours_tokens
            rows.append((f"greedy {n} new tokens vs PEFT `generate` (torch {peft.result('info')['device']})",
                         medians[0], medians[-1],
                         "tokens equal" if same else "tokens differ (PEFT suppresses EOS: min_new_tokens)"))
        keep1, full = interleaved([(ours, "prefill_keep1"), (ours, "prefill_full")], args.repeats * 2)
        rows.append((f"prefill {args.prompt_tokens} tokens: `logits_to_keep=1` vs all positions' logits", keep1, full,
                     f"{args.batch}x{args.prompt_tokens}x{info['vocab']} logits not computed"))
    finally:
        for w in workers:
            w.close()
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    print(f"\n### ptuning_onnx.runtime: {args.model_size} GPT-2, {args.dtype}, batch {args.batch}, prompt "
          f"{args.prompt_tokens}, {args.num_virtual_tokens} virtual tokens, {info['providers'][0]}, threads "
          f"{args.threads or 'default'}, {os.cpu_count()} cores; medians of {args.repeats}, interleaved\n")
    print("| measurement | ours (ms) | baseline (ms) | baseline / ours | note |")
    print("|---|---:|---:|---:|---|")
    for name, a, b, note in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {note} |")
    print(f"| cold start: `import ptuning_onnx.runtime` + `load()` (fresh process, median of 3) | {imp + load:.0f} "
          f"| - | - | import {imp:.0f} + load {load:.0f} (sha256 of {size:.1f} MB included) |")
    print(f"\nload average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
          f"(other processes on the machine make the absolute numbers noisy; the ratios are interleaved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
