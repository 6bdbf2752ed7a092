"""Does an anchored template beat the prefix at the same number of virtual tokens? (issue 12)

    python tools/template_compare.py [--work /tmp/tcmp] [--json out.json] [--no-export]
                                     [--variants prefix anchor] [--seeds 42 1 2]

On the real all-MiniLM-L6-v2, the demo's sentiment task and settings (``ptuning-demo``: the shipped 300/100 split,
6 epochs, batch 16, learning rate 3e-2, seed 42, MLP encoder), trains three prompts of 20 virtual tokens each:

- ``prefix``:  ``<p:20> {text}`` (exactly the plain prefix mode, i.e. PEFT's P-tuning)
- ``anchor``:  ``<p:10> {text} <p:10> It was`` (the paper's shape: slots around the input, ending in an anchor)
- ``anchor-prefix``: ``<p:20> {text} It was`` (the anchor words without a virtual slot after the input)

and reports each one's held-out accuracy per epoch (PyTorch), then exports ``prefix`` and ``anchor`` with the
parity check and classifies the held-out split again through the torch-free runtime from the raw rows. With
several ``--seeds`` (initialisation and data order) every variant trains once per seed; the first seed's runs are
exported. The held-out split has 100 sentences: one sentence is one point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"prefix": "<p:20> {text}", "anchor": "<p:10> {text} <p:10> It was",
            "anchor-prefix": "<p:20> {text} It was"}
EXPORTED = ("prefix", "anchor")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/tcmp"))
    p.add_argument("--json", type=Path)
    p.add_argument("--no-export", action="store_true", help="PyTorch accuracies only")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[42])
    args = p.parse_args(argv)
    import torch

    from ptuning_onnx import runtime
    from ptuning_onnx.cli.demo import DATA, _read_jsonl, default_base_model
    from ptuning_onnx.export import export
    from ptuning_onnx.train import TrainArgs, train

    base = default_base_model()
    rows = _read_jsonl(DATA / "test.jsonl")
    results = {"threads": torch.get_num_threads(), "variants": {}}
    runs = [(name, seed) for seed in args.seeds for name in args.variants]
    for name, seed in runs:
        template = VARIANTS[name]
        key = name if len(args.seeds) == 1 else f"{name}/seed{seed}"
        adapter = args.work / key.replace("/", "-")
        start = time.perf_counter()
        result = train(TrainArgs(base_model=str(base), task="seq-cls", train_file=str(DATA / "train.jsonl"),
                                 eval_file=str(DATA / "test.jsonl"), output=str(adapter), template=template,
                                 epochs=6, learning_rate=3e-2, batch_size=16, seed=seed, quiet=True))
        entry = {"template": template, "seed": seed, "train_s": round(time.perf_counter() - start, 1),
                 "accuracy_per_epoch": [round(e["accuracy"], 4) for e in result.evals],
                 "accuracy": result.evals[-1]["accuracy"]}
        if name in EXPORTED and not args.no_export and seed == args.seeds[0]:
            start = time.perf_counter()
            exported = export(base, adapter, args.work / f"{key.replace('/', '-')}-onnx", progress=False,
                              overwrite=True)
            model = runtime.load(exported.path, provider="cpu")
            predictions = model.classify([{"text": row["text"]} for row in rows])
            entry.update(export_s=round(time.perf_counter() - start, 1),
                         parity_max_abs_diff=max(exported.report["max_abs_diff"].values()),
                         negative_control_max_abs_diff=max(
                             exported.report["negative_control"]["max_abs_diff"].values()),
                         onnx_accuracy=sum(p["label"] == r["label"] for p, r in zip(predictions, rows, strict=True))
                         / len(rows))
        results["variants"][key] = entry
        print(json.dumps({key: entry}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True))
    for name, entry in results["variants"].items():
        onnx = f", ONNX {entry['onnx_accuracy']:.1%}" if "onnx_accuracy" in entry else ""
        print(f"{name:>14}  {entry['template']:<30} held-out {entry['accuracy']:.1%}{onnx}  ({entry['train_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
