"""Held-out accuracy of the trained demo through fp32, int8 and int4 exports (issue 8: int8 may cost <= 1 point).

    python tools/quantized_accuracy.py [--work /tmp/qacc] [--json out.json]

Trains the demo's prompt (all-MiniLM-L6-v2, sentiment, ``ptuning-demo``'s settings) once into ``WORK/adapter``,
exports it three times with the parity gate (fp32 exact; int8/int4 teacher-forced relative gate), and classifies the
shipped held-out split (ptuning_onnx/data/sentiment/test.jsonl) with the torch-free runtime. Prints accuracies, the
drops against fp32, and batch-32 classify time per variant (median of 5, 2 threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/qacc"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from ptuning_onnx import runtime
    from ptuning_onnx.cli.demo import DATA, _read_jsonl, default_base_model
    from ptuning_onnx.errors import ParityError
    from ptuning_onnx.export import export
    from ptuning_onnx.train import TrainArgs, train

    base, adapter = default_base_model(), args.work / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        train(TrainArgs(base_model=str(base), task="seq-cls", train_file=str(DATA / "train.jsonl"),
                        eval_file=str(DATA / "test.jsonl"), output=str(adapter), num_virtual_tokens=10, epochs=6,
                        learning_rate=3e-2, batch_size=16, seed=42, quiet=True))
    rows = _read_jsonl(DATA / "test.jsonl")
    texts = [row["text"] for row in rows]
    report = {"held_out": len(rows), "variants": {}}
    for variant in ("fp32", "int8", "int4"):
        folder = args.work / variant
        if not (folder / "ptuning_onnx.json").is_file():
            try:
                export(base, adapter, folder, quantize=None if variant == "fp32" else variant, overwrite=True,
                       progress=False)
            except ParityError as exc:  # the gate refused this variant: that is a result too
                report["variants"][variant] = {"refused": str(exc)}
                print(f"{variant}: refused by the parity gate: {exc}")
                continue
        model = runtime.load(folder, provider="cpu", threads=2)
        predicted = model.classify(texts)
        accuracy = sum(p["label"] == r["label"] for p, r in zip(predicted, rows, strict=True)) / len(rows)
        batch = texts[:32]
        model.classify(batch)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            model.classify(batch)
            times.append(time.perf_counter() - start)
        parity = model.manifest.get("parity") or {}
        report["variants"][variant] = {
            "accuracy": accuracy, "classify_b32_ms": round(statistics.median(times) * 1e3, 2),
            "gate": parity.get("relative_error") or parity.get("max_abs_diff")}
    fp32 = report["variants"]["fp32"]
    for variant, row in report["variants"].items():
        if "refused" in row:
            continue
        row["drop_points"] = round((fp32["accuracy"] - row["accuracy"]) * 100, 1)
        row["time_vs_fp32"] = round(row["classify_b32_ms"] / fp32["classify_b32_ms"], 2)
        print(f"{variant}: accuracy {row['accuracy']:.1%} (drop {row['drop_points']} points), classify batch 32 "
              f"{row['classify_b32_ms']} ms ({row['time_vs_fp32']}x fp32), gate {json.dumps(row['gate'])}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
