"""``ptuning-serve``: the HTTP service over an exported folder (a thin layer over ``ptuning_onnx.serve``).

Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client). Exit codes: 0 after a drain (SIGTERM); 1 the
folder's golden self-check failed; 2 bad input (arguments, folder, API key file, port in use); 3 internal error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from ._common import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptuning-serve", description="Serve an exported ptuning-onnx folder over HTTP "
                                "(JSON, OpenAI-compatible /v1/completions and /v1/embeddings, Prometheus /metrics).")
    p.add_argument("model", metavar="DIR", help="exported folder (with ptuning_onnx.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--provider", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--max-batch-size", type=int, default=16, metavar="N",
                   help="rows run together at most (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a batch waits for more rows (default: %(default)s)")
    p.add_argument("--max-new-tokens-limit", type=int, default=512, metavar="N",
                   help="largest max_new_tokens / max_tokens a request may ask for (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                   help="largest request body (default: %(default)s)")
    p.add_argument("--api-key-file", type=Path, metavar="FILE",
                   help="file holding the API key; /v1/* then need 'Authorization: Bearer <key>'")
    return p


@run_cli
def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    from .. import manifest as mf

    try:
        from ..serve import ServeConfig, serve
    except ImportError as exc:
        raise ConfigError(f"ptuning-serve needs the serve extra: pip install 'ptuning-onnx[serve]' ({exc})") from None

    folder = Path(args.model)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    mf.read_manifest(folder, verify=False)  # not an export: a one-line error now, not after the port opened
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"port must be in [0, 65535], got {args.port}")
    key = None
    if args.api_key_file is not None:
        key = args.api_key_file.read_text(encoding="utf-8").strip()
        if not key:
            raise ConfigError(f"API key file {args.api_key_file} is empty")
    config = ServeConfig(folder, provider=args.provider, threads=args.threads, max_batch_size=args.max_batch_size,
                         max_wait_ms=args.max_wait_ms, max_new_tokens_limit=args.max_new_tokens_limit,
                         max_body_bytes=args.max_body_bytes, api_key=key)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("ptuning_onnx.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    code, message = serve(config, args.host, args.port)
    if message:
        print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
