"""Trim an onnxruntime-gpu wheel to what one GPU architecture runs, so that it travels in few 60 MiB parts.

    python tools/gpu/trim_ort.py onnxruntime_gpu-1.31.1-....whl OUT_DIR [--keep-sm 90]

Writes ``OUT_DIR/onnxruntime/`` (the package, ready for ``PYTHONPATH``) with:
- the CUDA provider's kernels for every architecture except ``--keep-sm`` zeroed in place. The provider keeps one
  ELF (SASS) image per architecture in each fatbin (sm 75, 80, 86, 89, 90 and 120 in 1.31.1, each entry zstd-
  compressed, no PTX); the driver loads only the image of the device's architecture, so the others are dead weight
  on a given GPU. Headers and sizes stay as they were, only payload bytes become zeros, which then compress to
  nothing. 284 MB -> 218 MB of kernels of which sm 90 is 77 MB.
- the TensorRT provider left out (not used).
The result runs only on GPUs of the kept architecture (H100/H200: 90). Never use it as a general install.
"""

from __future__ import annotations

import argparse
import struct
import sys
import zipfile
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
PROVIDER = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
LEAVE_OUT = ("onnxruntime/capi/libonnxruntime_providers_tensorrt.so",)


def _section(data: bytes, wanted: str) -> tuple[int, int]:
    """(offset, size) of an ELF64 section by name."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    for name, _type, _flags, _addr, offset, size in headers:
        end = data.index(b"\0", strtab + name)
        if data[strtab + name:end].decode() == wanted:
            return offset, size
    raise ValueError(f"no {wanted} section")


def trim_fatbins(data: bytearray, keep_sm: set[int]) -> dict:
    """Zero the payload of every fatbin entry whose architecture is not in ``keep_sm``; returns counts."""
    start, size = _section(bytes(data), ".nv_fatbin")
    pos, end = start, start + size
    kept = dropped = 0
    kept_bytes = dropped_bytes = 0
    while pos < end:
        magic, _version, header, body = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:  # fatbins are 8-byte aligned with zero padding between them
            pos += 8
            continue
        entry, stop = pos + header, pos + header + body
        while entry < stop:
            _kind, _v, entry_header, padded = struct.unpack_from("<HHIQ", data, entry)
            sm = struct.unpack_from("<I", data, entry + 28)[0]
            payload = entry + entry_header
            if sm in keep_sm:
                kept, kept_bytes = kept + 1, kept_bytes + padded
            else:
                data[payload:payload + padded] = bytes(padded)
                dropped, dropped_bytes = dropped + 1, dropped_bytes + padded
            entry = payload + padded
        pos = stop
    if not kept:
        raise ValueError(f"no kernels for sm {sorted(keep_sm)} in the provider: wrong --keep-sm?")
    return {"kept": kept, "kept_mb": round(kept_bytes / 1e6, 1), "zeroed": dropped,
            "zeroed_mb": round(dropped_bytes / 1e6, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel")
    p.add_argument("out")
    p.add_argument("--keep-sm", type=int, action="append", help="architecture to keep (default 90)")
    args = p.parse_args(argv)
    keep = set(args.keep_sm or [90])
    out = Path(args.out)
    with zipfile.ZipFile(args.wheel) as wheel:
        for info in wheel.infolist():
            if info.is_dir() or not info.filename.startswith("onnxruntime/") or info.filename in LEAVE_OUT:
                continue
            target = out / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            data = bytearray(wheel.read(info))
            if info.filename == PROVIDER:
                print(f"{PROVIDER}: {trim_fatbins(data, keep)}")
            target.write_bytes(data)
            if info.external_attr >> 16 & 0o111:
                target.chmod(0o755)
    return 0


if __name__ == "__main__":
    sys.exit(main())
