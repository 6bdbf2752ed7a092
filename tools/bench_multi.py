"""4 adapters served from ONE multi-prompt folder against 4 separately loaded folders: memory and throughput.

    python tools/bench_multi.py [--size small|tiny] [--requests 48] [--batch 8] [--work DIR]

Builds (cached under --work) a base model (small: a random GPT-2-small shape, 124M; tiny: models/gpt2), 4 PEFT
adapters with different prompt lengths and encoders, their 4 single exports and one multi-prompt export (whose
parity against each adapter alone runs, as always). Then each configuration runs in its own process, one after the
other, 2 onnxruntime threads per session:

- ``one``: a single folder loaded, serving the same batches (every row on its one adapter): the baseline;
- ``separate``: the 4 folders loaded; each batch of the mixed workload is split by adapter, one call per adapter;
- ``multi``: the multi-prompt folder; each batch is one call with ``adapters=[...]``.

The workload: ``--requests`` requests in arrival order, adapters drawn at random (seeded), prompts of 16-48 random
ids (left-padded in a batch), 16 new greedy tokens each without EOS, served ``--batch`` requests at a time. Reported:
RSS after load and peak RSS (VmHWM), requests/s and tokens/s, and whether every answer of ``multi`` equals
``separate``'s. Issue 11's goals: multi's memory <= 1.1x one folder's; its throughput >= the 4 folders'.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
ADAPTERS = {"news": ("MLP", 20, 0), "chat": ("LSTM", 10, 1), "code": ("MLP", 30, 2), "legal": ("LSTM", 20, 3)}
NEW_TOKENS = 16


def build(size: str, work: Path) -> dict:
    import torch
    from peft import PromptEncoderConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench_runtime import build_base
    from ptuning_onnx.export import export
    from ptuning_onnx.export.multi import export_multi

    work.mkdir(parents=True, exist_ok=True)
    base = build_base(size, work)
    adapters = {}
    for name, (encoder, n, seed) in ADAPTERS.items():
        adapters[name] = work / f"adapter-{name}"
        if not (adapters[name] / "adapter_config.json").is_file():
            torch.manual_seed(seed)
            peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), PromptEncoderConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_hidden_size=128,
                encoder_reparameterization_type=encoder))
            with torch.no_grad():
                for p in peft.prompt_encoder.parameters():
                    p.add_(torch.randn_like(p) * 0.5)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft.eval().save_pretrained(adapters[name])
    folders = {}
    for name, path in adapters.items():
        folders[name] = work / f"single-{name}"
        if not (folders[name] / "ptuning_onnx.json").is_file():
            start = time.perf_counter()
            export(base, path, folders[name], progress=False, overwrite=True)
            print(f"[bench] single export {name}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    multi = work / "multi"
    if not (multi / "ptuning_onnx.json").is_file():
        start = time.perf_counter()
        result = export_multi(base, adapters, multi, progress=False, overwrite=True)
        print(f"[bench] multi export: {time.perf_counter() - start:.1f}s, parity max abs diff "
              f"{result.report['max_abs_diff']}, negative control "
              f"{result.report['negative_control']['min_row_max_abs_diff']:.3g}", file=sys.stderr)
    return {"singles": {k: str(v) for k, v in folders.items()}, "multi": str(multi)}


def workload(requests: int, seed: int = 0) -> list:
    import numpy as np

    rng = np.random.default_rng(seed)
    names = list(ADAPTERS)
    return [(names[int(rng.integers(len(names)))], rng.integers(5, 1000, int(rng.integers(16, 49))).tolist())
            for _ in range(requests)]


def _padded(rows: list):
    import numpy as np

    width = max(len(r) for r in rows)
    ids = np.ones((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak (VmHWM), MB. Not ``ru_maxrss``: it survives ``exec`` and
    would report the launching process's peak (torch loaded) as the worker's."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024


def worker(kind: str, paths: dict, requests: int, batch: int) -> dict:
    import numpy as np

    from ptuning_onnx import runtime

    start = time.perf_counter()
    if kind == "multi":
        models = {"multi": runtime.load(paths["multi"], provider="cpu", threads=2)}
    elif kind == "separate":
        models = {name: runtime.load(path, provider="cpu", threads=2) for name, path in paths["singles"].items()}
    else:
        first = next(iter(paths["singles"]))
        models = {first: runtime.load(paths["singles"][first], provider="cpu", threads=2)}
    load_s = time.perf_counter() - start
    out = {"kind": kind, "load_s": load_s, "rss_after_load_mb": _rss_mb()}
    work = workload(requests)
    if kind == "one":  # the same batches, every row on the one folder: its memory while serving
        work = [(next(iter(models)), row) for _, row in work]
    answers: list = [None] * len(work)
    warm = _padded([work[0][1]])
    for model in models.values():  # one warm-up call per session, outside the clock
        model.generate(input_ids=warm[0], attention_mask=warm[1], max_new_tokens=2, eos_token_id=[],
                       **({"adapter": work[0][0]} if kind == "multi" else {}))
    start = time.perf_counter()
    for first in range(0, len(work), batch):
        chunk = list(range(first, min(first + batch, len(work))))
        if kind in ("multi", "one"):
            ids, mask = _padded([work[i][1] for i in chunk])
            model = next(iter(models.values()))
            options = {"adapters": [work[i][0] for i in chunk]} if kind == "multi" else {}
            tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=[],
                                    **options)
            for row, i in enumerate(chunk):
                answers[i] = tokens[row].tolist()
        else:
            for name, model in models.items():
                rows = [i for i in chunk if work[i][0] == name]
                if not rows:
                    continue
                ids, mask = _padded([work[i][1] for i in rows])
                tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                        eos_token_id=[])
                for row, i in enumerate(rows):
                    answers[i] = tokens[row].tolist()
    seconds = time.perf_counter() - start
    out.update(seconds=seconds, requests_per_s=len(work) / seconds, tokens_per_s=len(work) * NEW_TOKENS / seconds,
               peak_rss_mb=_rss_mb("VmHWM"), answers=answers,
               calls_per_batch=np.mean([len({work[i][0] for i in range(f, min(f + batch, len(work)))})
                                        for f in range(0, len(work), batch)]) if kind == "separate" else 1.0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=["small", "tiny"], default="small")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--work", type=Path, default=Path("/tmp/ptuning-bench-multi"))
    p.add_argument("--worker", choices=["one", "separate", "multi"], help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.paths), args.requests, args.batch)))
        return 0
    paths = build(args.size, args.work / args.size)
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for kind in ("one", "separate", "multi"):
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--paths", json.dumps(paths),
                               "--requests", str(args.requests), "--batch", str(args.batch)],
                              capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            print(f"error: worker {kind} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    same = results["multi"]["answers"] == results["separate"]["answers"]
    one, sep, multi = results["one"], results["separate"], results["multi"]
    summary = {
        "size": args.size, "requests": args.requests, "batch": args.batch, "new_tokens": NEW_TOKENS,
        "adapters": {k: v[1] for k, v in ADAPTERS.items()},
        "rss_after_load_mb": {k: round(v["rss_after_load_mb"], 1) for k, v in results.items()},
        "peak_rss_mb": {k: round(v["peak_rss_mb"], 1) for k, v in results.items()},
        "load_s": {k: round(v["load_s"], 2) for k, v in results.items()},
        "tokens_per_s": {k: round(v["tokens_per_s"], 1) for k, v in results.items()},
        "separate_calls_per_batch": round(float(sep["calls_per_batch"]), 2),
        "answers_equal": same,
        "goals": {
            "multi peak RSS / one folder's <= 1.1": round(multi["peak_rss_mb"] / one["peak_rss_mb"], 3),
            "multi throughput / 4 folders' >= 1": round(multi["tokens_per_s"] / sep["tokens_per_s"], 3),
        },
    }
    print(json.dumps(summary, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
