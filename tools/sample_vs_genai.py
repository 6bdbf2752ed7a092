"""Sampled generation, ours against onnxruntime-genai, interleaved in one process: what sampling costs each side.

    python tools/sample_vs_genai.py --ours FOLDER --genai FOLDER [--new 64] [--rounds 4] [--threads 2]

FOLDER: a causal-lm export of ours (e.g. ``ptuning-bench --work W``'s ``W/llama/ours-int4``) and onnxruntime-genai's
builder export of the same base (``W/llama/genai-int4``). For batch 1 and 8 (64 prompt tokens), greedy and top-k 50
+ top-p 0.9 at temperature 0.8, it times whole generations of ``--new`` tokens (EOS never stops them) and prints
the medians and ours / genai per round. ``ptuning-bench`` times greedy decoding only; this adds the sampler.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLING = {"top_k": 50, "top_p": 0.9, "temperature": 0.8}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ours", required=True)
    p.add_argument("--genai", required=True)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import numpy as np
    import onnxruntime_genai as og

    from ptuning_onnx import runtime
    from ptuning_onnx.bench.contenders import set_genai_threads

    set_genai_threads(Path(args.genai), args.threads)
    genai_model = og.Model(args.genai)
    ours = runtime.load(args.ours, provider="cpu", threads=args.threads)

    def genai(ids, sample: bool) -> None:
        params = og.GeneratorParams(genai_model)
        options = dict(max_length=ids.shape[1] + args.new, min_length=ids.shape[1] + args.new,
                       batch_size=ids.shape[0], do_sample=sample)
        params.set_search_options(**options, **(SAMPLING if sample else {}))
        generator = og.Generator(genai_model, params)
        generator.append_tokens(ids.astype(np.int32))
        for _ in range(args.new):
            generator.generate_next_token()

    def mine(ids, sample: bool) -> None:
        extra = dict(do_sample=True, seed=0, **SAMPLING) if sample else {}
        ours.generate(input_ids=ids, max_new_tokens=args.new, eos_token_id=[], **extra)

    results = []
    for batch in (1, 8):
        ids = np.random.default_rng(0).integers(4, 1000, (batch, 64)).astype(np.int64)
        for sample in (False, True):
            times: dict = {"ours": [], "genai": []}
            for _ in range(args.rounds + 1):  # the first round warms up
                for name, run in (("genai", genai), ("ours", mine)):
                    start = time.perf_counter()
                    run(ids, sample)
                    times[name].append(time.perf_counter() - start)
            ours_ms, genai_ms = (np.array(times[k][1:]) * 1e3 for k in ("ours", "genai"))
            row = {"batch": batch, "decoding": "top-k 50 + top-p 0.9" if sample else "greedy",
                   "ours_ms": float(np.median(ours_ms)), "genai_ms": float(np.median(genai_ms)),
                   "ours_over_genai": float(np.median(ours_ms / genai_ms))}
            results.append(row)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
