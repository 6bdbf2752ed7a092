"""Export time: ``ptuning-export`` against optimum's own ``main_export`` of the same base model, side by side.

Each run is a whole process (imports included), A and B alternate so machine drift hits both, and the ratio is
taken pair by pair. Two pairings:
  * with checks:    ptuning-export (parity, 16 greedy steps, negative control)  vs  main_export (its validation)
  * without checks: ptuning-export --skip-verify                               vs  main_export(do_validation=False)

    python tools/bench_export.py --size tiny|small [--runs 3]

``small`` builds a GPT-2-small-shaped model (768 wide, 12 layers, random weights) in a temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_small(folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024))
    model.save_pretrained(folder / "base", safe_serialization=True)
    return folder / "base"


def make_adapter(base: Path, out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_peft_adapter

    make_peft_adapter(out, base, "CAUSAL_LM", "AutoModelForCausalLM", num_virtual_tokens=20)
    return out


def timed(cmd: list) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    base = ROOT / "models" / "gpt2" if args.size == "tiny" else build_small(work)
    adapter = make_adapter(base, work / "adapter")
    py = sys.executable
    rows = []
    for label, ours_extra, optimum_validate in (("with checks", [], True), ("without checks", ["--skip-verify"], False)):
        ours_t, theirs_t, ratios = [], [], []
        for i in range(args.runs + 1):  # the first pair warms the file cache and is not counted
            a = timed([py, "-m", "ptuning_onnx.cli.export", "--base-model", str(base), "--adapter", str(adapter),
                       "--output", str(work / f"ours-{label.split()[0]}-{i}"), "--quiet", *ours_extra])
            b = timed([py, "-c", "import sys; from optimum.exporters.onnx import main_export; "
                       "main_export(sys.argv[1], sys.argv[2], task='text-generation-with-past', "
                       f"do_validation={optimum_validate})", str(base), str(work / f"optimum-{label.split()[0]}-{i}")])
            if i:
                ours_t.append(a), theirs_t.append(b), ratios.append(a / b)
        rows.append((label, statistics.median(ours_t), statistics.median(theirs_t), statistics.median(ratios),
                     min(ratios), max(ratios)))
    print(f"\nExport time, {args.size} GPT-2 ({base}), {args.runs} pairs, whole processes\n")
    print("| pairing | ptuning-export (median s) | optimum main_export (median s) | ratio median (min-max) |")
    print("|---|---|---|---|")
    for label, a, b, r, lo, hi in rows:
        print(f"| {label} | {a:.2f} | {b:.2f} | {r:.2f} ({lo:.2f}-{hi:.2f}) |")


if __name__ == "__main__":
    main()
