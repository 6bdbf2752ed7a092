"""``ptuning-verify``: re-run the parity check on an exported folder and write a JSON report (for CI)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from ..errors import ParityError
from ._common import run_cli

EXIT_PARITY = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptuning-verify", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("folder", help="an exported folder (has ptuning_onnx.json)")
    p.add_argument("--base-model", help="base model folder (default: the path recorded at export)")
    p.add_argument("--adapter", help="adapter folder (default: the path recorded at export)")
    p.add_argument("--report", help="write the JSON parity report here")
    p.add_argument("--atol", type=float, help="tolerance (default: by dtype, as at export)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return p


@run_cli
def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.base_model is None) != (args.adapter is None):
        raise ParityError("pass both --base-model and --adapter, or neither")
    from ..parity import verify

    try:
        report = verify(args.folder, base_model=args.base_model, adapter=args.adapter, report=args.report,
                        atol=args.atol, device=args.device)
    except ParityError as exc:
        print(f"error: parity check failed: {exc}", file=sys.stderr)
        return EXIT_PARITY
    key = "relative_error" if "relative_error" in report else "max_abs_diff"  # quantized: parity_quantized
    print(json.dumps({"passed": report["passed"], key: report[key],
                      "negative_control": report["negative_control"]}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
