"""The real-sized check (issue 7): a 1.1B Llama (TinyLlama's shape, random weights) with a 20-token PEFT adapter,
exported fp32 (external data) and quantized, then run by the torch-free runtime. Benchmark-sized, so a tool and
not a unit test; tests/test_external_data.py covers the same code paths on tiny models.

    python tools/bench_big.py [--work /tmp/big] [--variants fp32,int4,int8,fp16,int4+optimize] [--json out.json]

Each export and each runtime run is its own process, so peak RSS (``ru_maxrss`` from ``wait4``) is that step's
alone. Prints a Markdown table: export time, the parity check's share, peak RSS against the fp32 weights, folder
size, parity figures, load time, time to first token and tokens/s (64 prompt tokens, 32 new, batch 1, 2 threads).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
              intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2)


def build(work: Path) -> tuple[Path, Path]:
    base, adapter = work / "llama1b", work / "ad"
    if not (base / "model.safetensors").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(base, safe_serialization=True)
    if not (adapter / "adapter_config.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_peft_adapter

        make_peft_adapter(adapter, base, "CAUSAL_LM", "AutoModelForCausalLM", num_virtual_tokens=20)
    return base, adapter


def run(cmd: list) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GB, stdout + stderr) of one child process; RSS from wait4, that child's alone."""
    import tempfile

    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        log.seek(0)
        text = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    return wall, usage.ru_maxrss / 1e6, text


RUNTIME = r"""
import json, sys, time
t0 = time.perf_counter()
from ptuning_onnx import runtime
import numpy as np
model = runtime.load(sys.argv[1], provider="cpu", threads=2)
load = time.perf_counter() - t0
ids = np.random.default_rng(0).integers(3, 32000, size=(1, 64))
model.generate(input_ids=ids, max_new_tokens=2)  # warm-up
first = []
for _ in range(3):
    t = time.perf_counter(); model.generate(input_ids=ids, max_new_tokens=1); first.append(time.perf_counter() - t)
t = time.perf_counter(); out = model.generate(input_ids=ids, max_new_tokens=32); whole = time.perf_counter() - t
ttft = sorted(first)[1]
print(json.dumps({"load_s": load, "ttft_s": ttft, "generate_32_s": whole,
                  "tokens_per_s": 31 / max(whole - ttft, 1e-9), "tokens": np.asarray(out).tolist()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/ptuning-big")
    parser.add_argument("--variants", default="fp32,int4")
    parser.add_argument("--json")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = build(work)
    weights = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
    rows = []
    for variant in args.variants.split(","):
        out = work / f"onnx-{variant}"
        kind, _, extra = variant.partition("+")  # "int4+optimize": the fused graph (export/build_llama.py)
        flags = [] if kind == "fp32" else ["--dtype", "fp16"] if kind == "fp16" else ["--quantize", kind]
        if extra == "optimize":
            flags.append("--optimize")
        elif extra:
            raise SystemExit(f"unknown variant suffix {extra!r} in {variant!r} (only +optimize)")
        wall, rss, log = run([sys.executable, "-m", "ptuning_onnx.cli.export", "--base-model", str(base),
                              "--adapter", str(adapter), "--output", str(out), "--overwrite", *flags])
        steps = {m[0]: float(m[1]) for m in re.findall(r"\] (.+?): done in ([\d.]+)s", log)}
        parity_s = sum(v for k, v in steps.items() if k.startswith("verifying"))
        manifest = json.loads((out / "ptuning_onnx.json").read_text())
        report = manifest["parity"]
        figure = report.get("relative_error") or report.get("max_abs_diff")
        size = sum(p.stat().st_size for p in out.iterdir()) / 1e9
        _, rt_rss, rt_out = run([sys.executable, "-c", RUNTIME, str(out)])
        rt = json.loads(rt_out.strip().splitlines()[-1])
        rows.append({"variant": variant, "export_s": wall, "parity_s": parity_s, "steps_s": steps,
                     "peak_rss_gb": rss, "rss_over_weights": rss / weights, "folder_gb": size,
                     "parity": figure, "fp32_exact": (report.get("fp32_exact") or {}).get("max_abs_diff"),
                     "runtime_rss_gb": rt_rss, **{k: v for k, v in rt.items() if k != "tokens"}})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n1.1B Llama (TinyLlama shape, random weights, {weights:.2f} GB fp32 safetensors), 20 virtual tokens, "
          "2 cores\n")
    print("| variant | export (s) | of which parity (s) | peak RSS (GB, x weights) | folder (GB) | parity | "
          "load (s) | TTFT 64 tokens (ms) | tokens/s | runtime RSS (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        parity = ", ".join(f"{k} {v:.2g}" for k, v in r["parity"].items())
        print(f"| {r['variant']} | {r['export_s']:.0f} | {r['parity_s']:.0f} | {r['peak_rss_gb']:.1f} "
              f"({r['rss_over_weights']:.2f}x) | {r['folder_gb']:.2f} | {parity} | {r['load_s']:.1f} | "
              f"{r['ttft_s'] * 1e3:.0f} | {r['tokens_per_s']:.1f} | {r['runtime_rss_gb']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
