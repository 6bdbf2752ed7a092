"""``ptuning-verify``: check an exported folder again: its golden cases through the runtime, without torch (the
default), or parity re-run against the PyTorch reference (``--reference``); JSON report for CI.

The default path imports numpy and onnxruntime only: it runs on the serving host, on the provider it will serve with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..errors import ConfigError, ParityError
from ._common import run_cli

EXIT_PARITY = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ptuning-verify",
        description="Check an exported folder: golden.npz (the PyTorch reference's outputs saved at export) through "
                    "the torch-free runtime, on this host's provider; or, with --reference, parity against PyTorch "
                    "again. Exit 0 passed, 1 mismatch, 2 bad input.")
    p.add_argument("folder", help="an exported folder (has ptuning_onnx.json)")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"],
                   help="golden check: execution provider (default auto: CUDA when it works)")
    p.add_argument("--report", help="write the JSON report here")
    ref = p.add_argument_group("re-run parity against PyTorch (needs torch, transformers, the base model and adapter)")
    ref.add_argument("--reference", action="store_true",
                     help="re-run parity against the PyTorch reference instead of the golden check; implied by "
                          "the options below")
    ref.add_argument("--base-model", help="base model folder (default: the path recorded at export)")
    ref.add_argument("--adapter", help="adapter folder (default: the path recorded at export)")
    ref.add_argument("--atol", type=float, help="tolerance (default: by dtype, as at export)")
    ref.add_argument("--device", choices=["cpu", "cuda"], help="onnxruntime device for the parity run (default cpu)")
    return p


@run_cli
def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    reference = args.reference or any(v is not None for v in (args.base_model, args.adapter, args.atol, args.device))
    if not reference:
        return _golden(args)
    if args.provider is not None:
        raise ConfigError("--provider is for the golden check; the PyTorch re-run takes --device")
    if (args.base_model is None) != (args.adapter is None):
        raise ParityError("pass both --base-model and --adapter, or neither")
    from ..parity import verify

    try:
        report = verify(args.folder, base_model=args.base_model, adapter=args.adapter, report=args.report,
                        atol=args.atol, device=args.device or "cpu")
    except ParityError as exc:
        print(f"error: parity check failed: {exc}", file=sys.stderr)
        return EXIT_PARITY
    key = "relative_error" if "relative_error" in report else "max_abs_diff"  # quantized: parity_quantized
    print(json.dumps({"check": "reference", "passed": report["passed"], key: report[key],
                      "negative_control": report["negative_control"]}, sort_keys=True))
    return 0


def _golden(args) -> int:
    import onnxruntime as ort

    from ..runtime.golden import GoldenMismatchError, verify_golden

    # onnxruntime-gpu 1.31 logs a warning line per CUDA session ("No registered plugin EP device found") through its
    # default logger; this command's output is its one line.
    ort.set_default_logger_severity(3)
    try:
        report = verify_golden(args.folder, provider=args.provider or "auto")
    except GoldenMismatchError as exc:
        _write(args.report, exc.report)
        print(f"error: golden check failed: {exc}", file=sys.stderr)
        return EXIT_PARITY
    _write(args.report, report)
    key = "relative_error" if report["gate"] == "quantized" else "max_abs_diff"
    summary = {k: report.get(k) for k in ("passed", "gate", "provider", key, "token_agreement")}
    summary["negative_control_failed"] = report["negative_control"]["failed_as_expected"]
    print(json.dumps({"check": "golden", **summary}, sort_keys=True))
    return 0


def _write(path: Optional[str], report: Optional[dict]) -> None:
    if path is not None and report is not None:
        Path(path).write_text(json.dumps(report, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
