"""Generation and classification speed on one GPU: our runtime (onnxruntime CUDA, IOBinding) against PEFT eager.

    python tools/gpu/bench_gpu.py --work /tmp/gpu/work --out report.json [--device cuda] [--dry-run]

For GPT-2-small and Llama-125M shapes: 64 prompt tokens, 128 new tokens (EOS never stops a row), batch 1 and 8;
ours from the fp16 export, PEFT in fp16 (``model.half()``), both on the same GPU in the same process, interleaved,
median of ``--repeats``. Also: greedy tokens of ours fp32 on the GPU against PEFT fp32 on the GPU (they must be
equal), and all-MiniLM-L6-v2 seq-cls at batch 32 x 128 tokens, fp16 against PEFT fp16. ``--dry-run`` runs the same
code on the CPU with the tiny models and few tokens (what CI-like checks on this side can afford).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PROMPT, NEW, BATCHES = 64, 128, (1, 8)


def bases(work: Path) -> dict:
    build = json.loads((work / "build.json").read_text())
    out = {}
    for entry in build["exports"].values():
        source = entry["source"]
        if source.startswith("repo:"):
            base = REPO / source.split(":", 1)[1]
        else:
            base = work / "models" / entry["model"]
        out[entry["model"]] = (base, work / "adapters" / entry["model"])
    return out


def timed(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up: kernels, allocations, cuBLAS handles
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peft_model(base: Path, adapter: Path, dtype, device, seq_cls: bool = False):
    import transformers
    from peft import PeftModel

    transformers.logging.set_verbosity_error()
    cls = transformers.AutoModelForSequenceClassification if seq_cls else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(base, dtype=dtype).to(device).eval()
    return PeftModel.from_pretrained(model, adapter).to(device).eval()


def _ours_generate(model, ids, new):
    return lambda: model.generate(input_ids=ids, max_new_tokens=new, eos_token_id=[])


def _peft_generate(model, ids, mask, new):
    import torch

    def run():
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
    return run


def generation(name: str, work: Path, device: str, new: int, repeats: int, batches, variants) -> dict:
    import torch

    from ptuning_onnx import runtime

    base, adapter = bases(work)[name]
    provider = "cuda" if device == "cuda" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    result = {"prompt_tokens": PROMPT, "new_tokens": new, "cells": []}
    ours = {v: runtime.load(work / "exports" / f"{name}-{v}", provider=provider) for v in variants
            if v != "fp32" and (work / "exports" / f"{name}-{v}").is_dir()}
    result["ours_providers"] = {v: m.providers for v, m in ours.items()}
    peft16 = peft_model(base, adapter, torch.float16, device)
    for batch in batches:
        ids = rng.integers(4, 1000, (batch, PROMPT)).astype(np.int64)
        t_ids = torch.from_numpy(ids).to(device)
        peft = _peft_generate(peft16, t_ids, torch.ones_like(t_ids), new)
        t_peft = timed(peft, repeats, sync)
        cell = {"batch": batch}
        for variant, model in ours.items():
            t_ours = timed(_ours_generate(model, ids, new), repeats, sync)
            cell[f"ours_{variant}_tok_s"] = round(batch * new / t_ours, 1)
        t_peft = min(t_peft, timed(peft, repeats, sync))  # interleaved: PEFT gets a second chance
        cell["peft_fp16_tok_s"] = round(batch * new / t_peft, 1)
        for variant in ours:
            cell[f"ratio_{variant}"] = round(cell[f"ours_{variant}_tok_s"] / cell["peft_fp16_tok_s"], 2)
        print(f"{name} batch {batch}: {cell}", flush=True)
        result["cells"].append(cell)
    peft16 = None
    if "fp32" not in variants:
        return result
    # fp32 greedy tokens: ours on this device against PEFT on this device
    ours32 = runtime.load(work / "exports" / f"{name}-fp32", provider=provider)
    peft32 = peft_model(base, adapter, torch.float32, device)
    ids = rng.integers(4, 1000, (4, PROMPT)).astype(np.int64)
    t_ids = torch.from_numpy(ids).to(device)
    with torch.inference_mode():
        theirs = peft32.generate(input_ids=t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=32,
                                 min_new_tokens=32, do_sample=False, pad_token_id=0)[:, PROMPT:].cpu().numpy()
    mine = ours32.generate(input_ids=ids, max_new_tokens=32, eos_token_id=[])
    result["fp32_greedy_equal"] = bool(np.array_equal(mine, theirs))
    result["fp32_greedy_rows_equal"] = int((mine == theirs).all(axis=1).sum())
    print(f"{name} fp32 greedy tokens equal to PEFT: {result['fp32_greedy_equal']}", flush=True)
    return result


def classification(name: str, work: Path, device: str, repeats: int, batch: int, tokens: int) -> dict:
    import torch

    from ptuning_onnx import runtime

    base, adapter = bases(work)[name]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ours = runtime.load(work / "exports" / f"{name}-fp16", provider="cuda" if device == "cuda" else "cpu")
    peft = peft_model(base, adapter, torch.float16, device, seq_cls=True)
    ids = np.random.default_rng(0).integers(4, min(ours.vocab_size, 20000), (batch, tokens)).astype(np.int64)
    mask = np.ones_like(ids)
    t_ids, t_mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)

    def run_peft():
        with torch.inference_mode():
            return peft(input_ids=t_ids, attention_mask=t_mask).logits.float().cpu().numpy()

    t_peft = timed(run_peft, repeats, sync)
    t_ours = timed(lambda: ours.forward(ids, mask), repeats, sync)
    diff = float(np.abs(ours.forward(ids, mask)["logits"].astype(np.float32) - run_peft()).max())
    cell = {"batch": batch, "tokens": tokens, "ours_fp16_ms": round(t_ours * 1e3, 2),
            "peft_fp16_ms": round(t_peft * 1e3, 2), "ratio": round(t_peft / t_ours, 2),
            "max_abs_diff_fp16_vs_peft_fp16": diff}
    print(f"{name} seq-cls: {cell}", flush=True)
    return cell


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dry-run", action="store_true", help="tiny models, few tokens (a check of this script)")
    p.add_argument("--variants", default="fp16,fp32",
                   help="our exports to time (fp16, fp16-fused; fp32 = the greedy-token check against PEFT)")
    args = p.parse_args(argv)
    import torch

    report = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "generation": {}, "classification": {}}
    if args.dry_run:
        gen_models, cls_models, new, batches, cls_shape = ["tiny-gpt2", "tiny-llama"], ["tiny-bert"], 8, (1, 2), (4, 16)
    else:
        gen_models, cls_models, new, batches, cls_shape = ["gpt2-small", "llama-125m"], ["minilm"], NEW, BATCHES, (32, 128)
    available = bases(args.work)
    for name in gen_models:
        if name in available:
            variants = args.variants.split(",")
            timed_variants = [v for v in variants if v != "fp32"] + (["fp32"] if "fp32" in variants else [])
            report["generation"][name] = generation(name, args.work, args.device, new, args.repeats, batches,
                                                    timed_variants)
    for name in cls_models:
        if name in available:
            report["classification"][name] = classification(name, args.work, args.device, max(args.repeats, 10),
                                                             *cls_shape)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
