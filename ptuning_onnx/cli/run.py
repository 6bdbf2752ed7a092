"""``ptuning-run``: run an exported folder once and print JSON, for quick checks (a thin layer over the runtime).

Torch-free: it imports only ``ptuning_onnx.runtime``. What is printed depends on the folder's task:
generation (``causal-lm``, ``seq2seq-lm``) prints the new tokens (and text), ``seq-cls`` labels, ``token-cls``
word labels, ``feature-extraction`` vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from ._common import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptuning-run", description="Run an exported ptuning-onnx folder and print JSON.")
    p.add_argument("model", metavar="DIR", help="exported folder (with ptuning_onnx.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", metavar="TEXT", help="input text; repeat for a batch")
    src.add_argument("--input-ids", action="append", metavar="1,2,3", help="comma-separated token ids; repeat for "
                     "a batch (rows of different lengths are padded on the model's padding side); write "
                     "--input-ids=-1,2 when the first id is negative")
    p.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="generation (default: %(default)s)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, metavar="F")
    p.add_argument("--top-k", type=int, metavar="N")
    p.add_argument("--top-p", type=float, metavar="F")
    p.add_argument("--repetition-penalty", type=float, metavar="F")
    p.add_argument("--seed", type=int, metavar="N", help="makes sampling reproducible")
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean", help="feature-extraction (default: mean)")
    p.add_argument("--provider", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the folder's files")
    return p


def parse_ids(rows: list, pad_id: int, side: str):
    """``["1,2,3", "4"]`` -> (ids, mask) as nested lists, padded on ``side``."""
    from ..runtime import InputError

    parsed = []
    for row in rows:
        try:
            parsed.append([int(x) for x in row.replace(" ", "").split(",") if x != ""])
        except ValueError:
            raise InputError(f"--input-ids must be comma-separated integers, got {row!r}") from None
    width = max(len(r) for r in parsed)
    ids, mask = [], []
    for r in parsed:
        pad = [pad_id] * (width - len(r))
        zeros, ones = [0] * (width - len(r)), [1] * len(r)
        ids.append(pad + r if side == "left" else r + pad)
        mask.append(zeros + ones if side == "left" else ones + zeros)
    return ids, mask


def _run(model, ns) -> dict:
    import numpy as np

    texts = ns.text
    ids = mask = None
    if ns.input_ids is not None:
        ids, mask = parse_ids(ns.input_ids, model.pad_token_id, model.padding_side)
        ids, mask = np.array(ids, dtype=np.int64), np.array(mask, dtype=np.int64)
    inputs = {"input_ids": ids, "attention_mask": mask} if texts is None else {}
    arg = texts if texts is not None else None
    if model.task in ("causal-lm", "seq2seq-lm"):
        options = dict(max_new_tokens=ns.max_new_tokens, do_sample=ns.do_sample, temperature=ns.temperature,
                       top_k=ns.top_k, top_p=ns.top_p, repetition_penalty=ns.repetition_penalty, seed=ns.seed)
        if texts is not None:
            return {"generated": model.generate(texts, **options)}
        tokens = model.generate(**inputs, **options)
        out = {"tokens": tokens.tolist()}
        if model.tokenizer is not None:
            out["generated"] = model.tokenizer.decode_batch(tokens)
        return out
    if model.task == "seq-cls":
        return {"results": model.classify(arg, **inputs)}
    if model.task == "token-cls":
        if texts is None:
            logits = model.forward(ids, mask)["logits"]
            return {"labels": [[model.id2label.get(int(i), f"LABEL_{int(i)}") for i, m in zip(row, mrow, strict=True) if m]
                               for row, mrow in zip(logits.argmax(-1), mask, strict=True)]}
        return {"results": model.tag(texts)}
    vectors = model.embed(arg, pooling=ns.pooling, **inputs)
    return {"embeddings": np.asarray(vectors, dtype=np.float64).round(6).tolist()}


@run_cli
def main(argv: Optional[list] = None) -> int:
    ns = build_parser().parse_args(argv)
    from .. import runtime

    model = runtime.load(ns.model, provider=ns.provider, threads=ns.threads, verify=not ns.no_verify)
    result = {"task": model.task, "providers": model.providers, **_run(model, ns)}
    try:
        sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `ptuning-run ... | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
