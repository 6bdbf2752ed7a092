"""GPU check, part (b), on the CPU: pack what the GPU machine lacks into parts of at most 60 MiB.

    python tools/gpu/pack.py --work /tmp/gpu-work --ort-wheel onnxruntime_gpu-1.31.1-...whl --out .gpu

What travels (one xz-compressed tar, split into ``core.partNN``, listed with sha256s in ``parts.json``):
- onnxruntime-gpu, trimmed to the H100/H200's kernels (``trim_ort.py``);
- every file of ``WORK`` except weights that the GPU machine can rebuild: each export's ``*.onnx.data`` is
  described tensor by tensor as a recipe, "tensor T of source S, as is / transposed / cast to fp16 the way
  onnxruntime's converter casts", where a source is a base model of the repo's ``models/`` (it travels with the
  repo), a seeded benchmark model (``weights.py`` rebuilds it), or a carried ``model.safetensors`` (the real
  MiniLM). Tensors no source explains (the baked prompt's keys and values, rotary tables) travel as bytes in
  ``residual.bin``. Identical files travel once.
``unpack.py`` reverses this on the GPU machine and checks every rebuilt file's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import trim_ort  # noqa: E402
import weights  # noqa: E402

PART_BYTES = 60 << 20
RECIPES = "recipes.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def as_fp16(array: np.ndarray) -> np.ndarray:
    """float32 -> float16 as onnxruntime's converter casts initializers (``convert_np_to_float16``): magnitudes
    strictly between 0 and 5.96e-08 become +-5.96e-08 (no flush to zero), finite ones above 65504 become +-65504.
    Restated here so that the GPU side needs no onnxruntime to rebuild; the sha256 check proves it agrees."""
    tiny, big = 5.96e-08, 65504.0
    array = np.where((array > 0) & (array < tiny), tiny, array)
    array = np.where((array < 0) & (array > -tiny), -tiny, array)
    array = np.where((array > big) & np.isfinite(array), big, array)
    array = np.where((array < -big) & np.isfinite(array), -big, array)
    return np.float16(array)


OPS = {
    "id": lambda a: a,
    "T": lambda a: np.ascontiguousarray(a.T),
    "fp16": as_fp16,
    "fp16T": lambda a: as_fp16(np.ascontiguousarray(a.T)),
}


def source_tensors(source: str, work: Path) -> dict:
    """``repo:models/gpt2`` / ``work:models/gpt2-small`` -> {name: float32 array} of its safetensors files."""
    from safetensors.numpy import load_file

    kind, rel = source.split(":", 1)
    folder = (REPO if kind == "repo" else work) / rel
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, value in load_file(file).items():
            if value.dtype == np.float32:
                tensors[f"{file.name}/{name}"] = value
    return tensors


def candidates(sources: dict, work: Path) -> dict:
    """sha256 of every (source, tensor, op) variant -> that triple."""
    found = {}
    for source in sources:
        for name, value in source_tensors(source, work).items():
            if value.size < 1024:  # small tensors travel as residual bytes
                continue
            for op, fn in OPS.items():
                if op.endswith("T") and value.ndim != 2:
                    continue
                found.setdefault(sha256(fn(value).tobytes()), (source, name, op))
    return found


def external_tensors(graph_file: Path) -> list:
    """(location, offset, length) of every external tensor (initializers, Constant nodes, subgraphs)."""
    import onnx

    model = onnx.load(str(graph_file), load_external_data=False)
    out = []

    def add(tensor):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            out.append((info["location"], int(info.get("offset", 0)), int(info["length"])))

    def walk(graph):
        for tensor in graph.initializer:
            add(tensor)
        for node in graph.node:
            for attr in node.attribute:
                for tensor in list(attr.tensors) + ([attr.t] if attr.HasField("t") else []):
                    add(tensor)
                for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                    walk(sub)

    walk(model.graph)
    return out


def describe_data_file(path: Path, tensors: list, known: dict, residual: io.BytesIO) -> dict:
    data = path.read_bytes()
    entries, residual_bytes = [], 0
    for offset, length in sorted(set(tensors)):
        chunk = data[offset:offset + length]
        hit = known.get(sha256(chunk))
        if hit:
            entries.append([offset, length, *hit])
        else:
            entries.append([offset, length, "residual", residual.tell()])
            residual.write(chunk)
            residual_bytes += length
    covered = np.zeros(len(data), bool)
    for offset, length, *_ in entries:
        covered[offset:offset + length] = True
    if np.frombuffer(data, np.uint8)[~covered].any():
        raise ValueError(f"{path}: bytes outside every tensor are not all zero; cannot describe it")
    return {"size": len(data), "sha256": sha256(data), "tensors": entries, "residual_bytes": residual_bytes}


def pack_work(work: Path, tar: tarfile.TarFile) -> dict:
    record = json.loads((work / "build.json").read_text())
    sources = {}
    for entry in record["exports"].values():
        source = entry["source"]
        if source.startswith("repo:"):
            key = source
        elif source == "minilm":  # the real MiniLM: its folder travels whole under models/minilm
            key = "work:models/minilm"
        else:
            key = "work:" + str(Path(entry["base"]).resolve().relative_to(work))
        sources.setdefault(key, set()).add(entry["model"])
        adapter = "work:" + str(Path(entry["adapter"]).resolve().relative_to(work))
        sources.setdefault(adapter, set()).add(entry["model"])
        entry["source_key"] = key
    minilm = next((Path(e["base"]) for e in record["exports"].values() if e["source"] == "minilm"), None)
    if minilm is not None and not (work / "models" / "minilm").is_dir():
        import shutil

        shutil.copytree(minilm, work / "models" / "minilm")
    known = candidates(sources, work)
    residual = io.BytesIO()
    recipes, blobs, files = {"data_files": {}}, {}, {}
    for path in sorted(p for p in work.rglob("*") if p.is_file()):
        rel = str(path.relative_to(work))
        if rel.startswith("adapter-build/") or rel.endswith(".log"):
            continue
        if path.name == "model.safetensors" and (path.parent / weights.SPEC_NAME).is_file():
            continue  # rebuilt from the spec
        if path.name.endswith(".onnx.data"):
            graph = path.with_name(path.name[:-len(".data")])
            tensors = [(o, n) for loc, o, n in external_tensors(graph) if loc == path.name]
            recipes["data_files"][rel] = describe_data_file(path, tensors, known, residual)
            continue
        data = path.read_bytes()
        digest = sha256(data)
        files[rel] = digest
        if digest not in blobs:
            blobs[digest] = len(data)
            _add(tar, f"blobs/{digest}", data)
    recipes["files"] = files
    recipes["sources"] = sorted(sources)
    recipes["build"] = record
    _add(tar, "residual.bin", residual.getvalue())
    _add(tar, RECIPES, json.dumps(recipes, indent=1, sort_keys=True).encode())
    return {"files": len(files), "unique_bytes": sum(blobs.values()), "residual_bytes": residual.tell(),
            "data_files": len(recipes["data_files"]),
            "described_bytes": sum(d["size"] for d in recipes["data_files"].values())}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="the folder build.py wrote")
    p.add_argument("--ort-wheel", type=Path, help="onnxruntime-gpu wheel (CUDA 13); without it, no onnxruntime "
                   "travels (the GPU side must have one)")
    p.add_argument("--keep-sm", type=int, default=90, help="GPU architecture to keep kernels for (H100: 90)")
    p.add_argument("--out", type=Path, required=True, help="folder for the parts and parts.json")
    p.add_argument("--part-mib", type=float, default=PART_BYTES / 2**20,
                   help="part size in MiB (default 60: the GPU machine's limit per call, with room for the repo)")
    args = p.parse_args(argv)
    work, out = args.work.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("core.part*"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        ort_dir = Path(tmp) / "ort"
        raw = Path(tmp) / "core.tar"
        with tarfile.open(raw, "w") as tar:
            if args.ort_wheel:
                trim_ort.main([str(args.ort_wheel), str(ort_dir), "--keep-sm", str(args.keep_sm)])
                tar.add(ort_dir / "onnxruntime", "ort/onnxruntime")
            stats = pack_work(work, tar)
        print(f"packed: {json.dumps(stats)}; tar {raw.stat().st_size / 2**20:.0f} MiB", flush=True)
        subprocess.run(["xz", "-6", "-T0", "-f", str(raw)], check=True)
        archive = raw.with_suffix(".tar.xz")
        whole = hashlib.sha256()
        parts = []
        with open(archive, "rb") as fh:
            while chunk := fh.read(int(args.part_mib * 2**20)):
                whole.update(chunk)
                name = f"core.part{len(parts):02d}"
                (out / name).write_bytes(chunk)
                parts.append({"name": name, "bytes": len(chunk), "sha256": sha256(chunk)})
    listing = {"archive": "core.tar.xz", "sha256": whole.hexdigest(), "parts": parts, "stats": stats}
    (out / "parts.json").write_text(json.dumps(listing, indent=1))
    total = sum(part["bytes"] for part in parts)
    print(f"{len(parts)} parts, {total / 2**20:.1f} MiB in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
