"""``ptuning-export``: base model + P-tuning adapter -> verified ONNX folder. A thin layer over ``export()``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..config import CLI_TASKS
from ..errors import ConfigError, ParityError
from ._common import run_cli

EXIT_PARITY = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptuning-export", description=__doc__.split(":")[1].strip())
    p.add_argument("--base-model", required=True, help="folder of the base model (config.json + safetensors)")
    p.add_argument("--adapter", required=True, action="append",
                   help="P-tuning adapter folder (ours or PEFT's); repeat as --adapter NAME=DIR for ONE multi-prompt "
                        "export of several adapters of the same base model, chosen per row by a prompt_ids input")
    p.add_argument("--output", required=True, help="folder to write; refused if non-empty without --overwrite")
    p.add_argument("--task", choices=sorted(CLI_TASKS), help="default: the adapter's task_type")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where parity runs")
    p.add_argument("--optimize", action="store_true",
                   help="onnxruntime's transformer fusions (layer norms, GELU, rotary, attention where it matches), "
                        "kept only if they time faster on this model; the decision goes in the manifest")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="int8: dynamic int8 MatMul; int4: weight-only 4-bit MatMulNBits, lm_head included")
    p.add_argument("--int4-block-size", type=int, metavar="N",
                   help="weights per int4 scale: 16, 32 (default, as onnxruntime-genai), 64, 128 or 256; larger "
                        "blocks are smaller and faster on the CPU and less exact (the quantized gate still applies)")
    p.add_argument("--external-data", action=argparse.BooleanOptionalAction, default=None,
                   help="keep weights in <graph>.onnx.data, or (--no-external-data) inside the graph up to protobuf's "
                        "2 GiB (default: outside when over 64 MiB, where onnxruntime maps them instead of copying: "
                        "faster loads, half the peak memory)")
    p.add_argument("--atol", type=float, help="parity tolerance (default 1e-4 fp32, 1e-2 + 2%% of scale fp16); quantized graphs have their own gate "
                        "(docs/FORMAT.md)")
    p.add_argument("--skip-verify", action="store_true", help="do not run the parity check (not recommended)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    p.add_argument("--exporter", choices=["auto", "torchscript", "dynamo"], default="auto",
                   help="torch.onnx route: torchscript inside optimum's patcher (default when optimum-onnx is "
                        "installed) or dynamo (no optimum; for transformers versions optimum does not support)")
    p.add_argument("--triton-repository", metavar="DIR",
                   help="also write a Triton Inference Server model repository (onnxruntime backend) from the "
                        "export: DIR/<name>/config.pbtxt and DIR/<name>/1/ (docs/TRITON.md)")
    p.add_argument("--triton-model-name", help="the Triton model's name (default: the --output folder's name)")
    p.add_argument("--triton-max-batch-size", type=int, default=8,
                   help="max_batch_size of the Triton config; dynamic batching joins requests up to it")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


@run_cli
def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    triton_name = None
    if args.triton_repository:
        from ..triton import check_target

        triton_name = args.triton_model_name or Path(args.output).resolve().name
        # Refused before the export runs; write_repository checks again with the task's model names.
        check_target(args.triton_repository, triton_name, args.task, overwrite=args.overwrite,
                     max_batch_size=args.triton_max_batch_size)
    elif args.triton_model_name or args.triton_max_batch_size != 8:
        raise ConfigError("--triton-model-name and --triton-max-batch-size go with --triton-repository")
    from ..export import export

    try:
        single = args.adapter[0] if len(args.adapter) == 1 else None
        if single is not None and ("=" not in single or Path(single).is_dir()):  # a folder named "lr=0.1" too
            result = export(args.base_model, single, args.output, task=args.task, opset=args.opset,
                            dtype=args.dtype, device=args.device, optimize=args.optimize, quantize=args.quantize,
                            atol=args.atol, skip_verify=args.skip_verify, overwrite=args.overwrite,
                            progress=not args.quiet, exporter=args.exporter,
                            external_data=args.external_data,
                            int4_block_size=args.int4_block_size)
        else:
            result = _export_multi(args)
    except ParityError as exc:
        print(f"error: parity check failed: {exc}", file=sys.stderr)
        return EXIT_PARITY
    summary = {"output": str(result.path), "task": result.manifest["task"]}
    if result.report is not None:
        key = "relative_error" if "relative_error" in result.report else "max_abs_diff"  # quantized: parity_quantized
        summary["parity"] = {"passed": result.report["passed"], key: result.report[key]}
    if "adapters" in result.manifest:
        summary["adapters"] = {name: entry["id"] for name, entry in result.manifest["adapters"].items()}
    if args.triton_repository:
        from ..triton import write_repository

        models = write_repository(result.path, args.triton_repository, name=triton_name,
                                  max_batch_size=args.triton_max_batch_size, overwrite=args.overwrite)
        summary["triton"] = [str(m) for m in models]
    print(json.dumps(summary, sort_keys=True))
    return 0


def _export_multi(args):
    from ..export.multi import export_multi, parse_adapter_specs

    adapters = parse_adapter_specs(args.adapter)
    return export_multi(args.base_model, adapters, args.output, task=args.task, opset=args.opset, dtype=args.dtype,
                        device=args.device, optimize=args.optimize, quantize=args.quantize, atol=args.atol,
                        skip_verify=args.skip_verify, overwrite=args.overwrite, progress=not args.quiet,
                        exporter=args.exporter, external_data=args.external_data,
                        int4_block_size=args.int4_block_size)


if __name__ == "__main__":
    sys.exit(main())
