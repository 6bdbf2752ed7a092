"""GPU check, part (a), on the CPU: the base models, their PEFT adapters and every export, fp32 and fp16.

    python tools/gpu/build.py --work /tmp/gpu-work [--only tiny-gpt2,llama-125m] [--skip-minilm]

Writes ``WORK/models/<name>`` (the bases that are not already in the repo), ``WORK/adapters/<name>`` (written by
PEFT, seed 0) and ``WORK/exports/<name>-<dtype>`` (``ptuning-export`` with its parity check; every export keeps
its weights in an external data file so that ``pack.py`` can describe them instead of copying them), plus
``WORK/build.json``: what was built from what, export times and parity figures (fp16 diffs on the larger shapes
included). Already built exports are kept (delete the folder to rebuild).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import weights  # noqa: E402

# name: (base source, task, PEFT task, labels). "repo:<dir>" = a tiny model of models/ (it travels with the repo);
# "seeded:<shape>" = a benchmark shape with seeded weights (rebuilt there); "minilm" = the real all-MiniLM-L6-v2.
MODELS = {
    "tiny-gpt2": ("repo:models/gpt2", "CAUSAL_LM", None),
    "tiny-llama": ("repo:models/llama", "CAUSAL_LM", None),
    "tiny-bert": ("repo:models/bert", "SEQ_CLS", 2),
    "gpt2-small": ("seeded:gpt2", "CAUSAL_LM", None),
    "llama-125m": ("seeded:llama", "CAUSAL_LM", None),
    "minilm": ("minilm", "SEQ_CLS", 2),
    # The tiny Llama with a "massive activation" (400 in channel 5 of every 7th token's embedding, as trained
    # decoders have): x^2 overflows fp16. Exported a third time as "-fp16-unkept", without the fp32 RMSNorm
    # statistics (export/fp16.py), as the control that shows what the rule prevents on a GPU.
    "tiny-llama-massive": ("massive:models/llama", "CAUSAL_LM", None),
}
DTYPES = ("fp32", "fp16")
SEED = 0
STD = 0.02  # transformers' initializer_range for both shapes


def base_folder(name: str, source: str, work: Path) -> Path:
    if source.startswith("repo:"):
        return REPO / source.split(":", 1)[1]
    if source.startswith("massive:"):
        return massive_folder(name, REPO / source.split(":", 1)[1], work)
    if source == "minilm":
        from ptuning_onnx.bench.workloads import minilm_folder

        return minilm_folder()
    folder = work / "models" / name
    if (folder / weights.SPEC_NAME).is_file():
        return folder
    import torch
    import transformers

    from ptuning_onnx.bench.workloads import MODELS as TINY
    from ptuning_onnx.bench.workloads import TOKENIZER_FILES, llama_125m_config

    shape = source.split(":", 1)[1]
    if shape == "llama":
        config, cls = llama_125m_config(), transformers.LlamaForCausalLM
    else:
        config, cls = transformers.GPT2Config(), transformers.GPT2LMHeadModel
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(SEED)
    cls(config).eval().save_pretrained(tmp, safe_serialization=True)
    weights.reseed_folder(tmp, SEED, STD)
    for file in TOKENIZER_FILES:  # the tiny model's tokenizer (ids < 1000): the checks feed ids
        shutil.copy2(TINY / shape / file, tmp / file)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def massive_folder(name: str, tiny: Path, work: Path) -> Path:
    from safetensors.numpy import load_file, save_file

    folder = work / "models" / name
    if not (folder / "model.safetensors").is_file():
        shutil.copytree(tiny, folder, dirs_exist_ok=True)
        tensors = load_file(tiny / "model.safetensors")
        tensors["model.embed_tokens.weight"][::7, 5] = 400.0
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def export_unkept(base: Path, adapter: Path, out: Path):
    """The fp16 export without the fp32 RMSNorm statistics: a control for the GPU run, never a product."""
    import importlib

    from ptuning_onnx.export import export

    fp16 = importlib.import_module("ptuning_onnx.export.fp16")
    saved, fp16.norm_statistics_nodes = fp16.norm_statistics_nodes, lambda graph: []
    try:
        return export(base, adapter, out, dtype="fp16", external_data=True, overwrite=True, progress=False)
    finally:
        fp16.norm_statistics_nodes = saved


def export_fused(base: Path, adapter: Path, out: Path):
    """fp16 with onnxruntime's fusions kept whatever the CPU timing says (``--optimize`` decides by CPU time):
    what the GPU run measures against the unfused fp16 export."""
    import importlib

    from ptuning_onnx.export import export

    fusion = importlib.import_module("ptuning_onnx.export.fusion")
    saved, fusion._time_both = fusion._time_both, lambda *args: (1.0, 0.0)
    try:
        return export(base, adapter, out, dtype="fp16", optimize=True, external_data=True, overwrite=True,
                      progress=False)
    finally:
        fusion._time_both = saved


def adapter_folder(name: str, base: Path, peft_task: str, labels, work: Path) -> Path:
    from ptuning_onnx.bench.workloads import Workload, build_adapter

    workload = Workload(name, "generate" if peft_task == "CAUSAL_LM" else "classify", name, (), 20, 64, (1,),
                        peft_task=peft_task, num_labels=labels)
    built = build_adapter(workload, base, work / "adapter-build")
    target = work / "adapters" / name
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(built, target)
    return target


def parity_figures(report: dict) -> dict:
    keep = ("max_abs_diff", "atol", "rtol", "passed", "negative_control", "greedy")
    return {k: report[k] for k in keep if k in report}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--only", help="comma-separated model names (default: all)")
    p.add_argument("--skip-minilm", action="store_true", help="leave out the real MiniLM (it travels as 87 MB)")
    args = p.parse_args(argv)
    from ptuning_onnx.export import export

    names = args.only.split(",") if args.only else list(MODELS)
    if args.skip_minilm and "minilm" in names:
        names.remove("minilm")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    work = args.work.resolve()
    record_path = work / "build.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"exports": {}}
    for name in names:
        source, peft_task, labels = MODELS[name]
        base = base_folder(name, source, work)
        adapter = adapter_folder(name, base, peft_task, labels, work)
        extra = ("fp16-unkept",) if source.startswith("massive:") else ("fp16-fused",) if source.startswith(
            "seeded:") else ()
        for dtype in DTYPES + extra:
            key = f"{name}-{dtype}"
            out = work / "exports" / key
            if (out / "ptuning_onnx.json").is_file() and key in record["exports"]:
                continue
            start = time.perf_counter()
            if dtype == "fp16-unkept":
                result = export_unkept(base, adapter, out)
            elif dtype == "fp16-fused":
                result = export_fused(base, adapter, out)
            else:
                result = export(base, adapter, out, dtype=dtype, external_data=True, overwrite=True,
                                progress=False)
            seconds = time.perf_counter() - start
            record["exports"][key] = {
                "model": name, "source": source, "dtype": dtype, "base": str(base), "adapter": str(adapter),
                "export_s": round(seconds, 1), "parity": parity_figures(result.manifest.get("parity") or {})}
            print(f"{key}: {seconds:.0f} s, parity {json.dumps(record['exports'][key]['parity'].get('max_abs_diff'))}",
                  flush=True)
            record_path.write_text(json.dumps(record, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
