"""GPU check, part (c), first half: reassemble the parts, check their sha256, rebuild every file.

    python tools/gpu/unpack.py --parts /tmp/gpu-parts --dest /tmp/gpu

Needs numpy, safetensors and onnx (all on the GPU machine). Writes ``DEST/site/onnxruntime`` (put ``DEST/site`` first on PYTHONPATH) and ``DEST/work`` (models,
adapters, exports). Every part, the whole archive and every rebuilt weight file is checked against its sha256;
any mismatch stops with exit 1 before anything runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import time
from pathlib import Path, PurePosixPath

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import weights  # noqa: E402


class UnpackError(RuntimeError):
    pass


def _safe(dest: Path, name: str) -> Path:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise UnpackError(f"refusing archive member {name!r}")
    return dest.joinpath(*rel.parts)


def reassemble(parts_dir: Path) -> Path:
    listing = json.loads((parts_dir / "parts.json").read_text())
    archive = parts_dir / listing["archive"]
    whole = hashlib.sha256()
    with open(archive, "wb") as out:
        for part in listing["parts"]:
            path = parts_dir / part["name"]
            if not path.is_file():
                raise UnpackError(f"part {part['name']} is missing from {parts_dir}")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise UnpackError(f"part {part['name']}: sha256 mismatch (damaged in transfer?)")
            whole.update(data)
            out.write(data)
    if whole.hexdigest() != listing["sha256"]:
        raise UnpackError("the reassembled archive's sha256 does not match parts.json")
    return archive


def extract(archive: Path, dest: Path) -> tuple[dict, bytes]:
    blobs, recipes, residual = {}, None, b""
    site = dest / "site"
    with tarfile.open(archive, "r:xz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            data = tar.extractfile(member).read()
            if member.name.startswith("ort/"):
                target = _safe(site, member.name[len("ort/"):])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                target.chmod(member.mode | 0o644)
            elif member.name.startswith("blobs/"):
                blobs[member.name[len("blobs/"):]] = data
            elif member.name == "residual.bin":
                residual = data
            elif member.name == "recipes.json":
                recipes = json.loads(data)
    if recipes is None:
        raise UnpackError("the archive has no recipes.json")
    work = dest / "work"
    for rel, digest in recipes["files"].items():
        if hashlib.sha256(blobs[digest]).hexdigest() != digest:
            raise UnpackError(f"{rel}: sha256 mismatch")
        target = _safe(work, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blobs[digest])
    return recipes, residual


def rebuild(recipes: dict, residual: bytes, work: Path) -> None:
    from pack import OPS, source_tensors

    for spec in sorted(work.glob(f"models/*/{weights.SPEC_NAME}")):
        weights.rebuild_folder(spec.parent)
    cache: dict = {}
    for rel, described in recipes["data_files"].items():
        buffer = bytearray(described["size"])
        for offset, length, source, *rest in described["tensors"]:
            if source == "residual":
                chunk = residual[rest[0]:rest[0] + length]
            else:
                name, op = rest
                if source not in cache:
                    cache.clear()  # one source at a time: they are used export by export
                    cache[source] = source_tensors(source, work)
                chunk = OPS[op](cache[source][name]).tobytes()
            if len(chunk) != length:
                raise UnpackError(f"{rel}: tensor at {offset} rebuilt as {len(chunk)} bytes, expected {length}")
            buffer[offset:offset + length] = chunk
        if hashlib.sha256(buffer).hexdigest() != described["sha256"]:
            raise UnpackError(f"{rel}: the rebuilt weights do not match their sha256")
        target = _safe(work, rel)
        target.write_bytes(buffer)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", type=Path, required=True)
    p.add_argument("--dest", type=Path, required=True)
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        archive = reassemble(args.parts)
        print(f"reassembled and checked {archive.name} ({time.perf_counter() - start:.1f} s)", flush=True)
        recipes, residual = extract(archive, args.dest)
        print(f"extracted ({time.perf_counter() - start:.1f} s)", flush=True)
        rebuild(recipes, residual, args.dest / "work")
    except (UnpackError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    (args.dest / "work" / "build.json").write_text(json.dumps(recipes["build"], indent=1))
    print(f"rebuilt {len(recipes['data_files'])} weight files, all sha256 checked "
          f"({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
