"""``ptuning_onnx.json``: the manifest that makes an exported folder describe itself.

Torch-free: the runtime reads it. The exporter writes it. Keys are sorted and indented; every file of the folder
is listed with its sha256 so that a modified or truncated graph is caught before a session is built.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from .errors import ManifestError

MANIFEST_NAME = "ptuning_onnx.json"
GOLDEN_NAME = "golden.npz"  # the parity cases and the reference's outputs (export/golden.py, runtime/golden.py)
FORMAT_NAME = "ptuning-onnx"
FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "added_tokens.json",
)
# Per-task graphs and the optional inputs whose defaults keep the standard interface (see docs/FORMAT.md).
TASK_GRAPHS = {
    "causal-lm": ("model",),
    "seq-cls": ("model",),
    "token-cls": ("model",),
    "feature-extraction": ("model",),
    "seq2seq-lm": ("encoder_model", "decoder_model"),
}


def sha256_file(path: os.PathLike, chunk: int = 1 << 20) -> str:
    """Streamed sha256, so a multi-GB graph never sits in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_files(folder: Path, names) -> dict:
    return {name: sha256_file(folder / name) for name in sorted(names)}


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: os.PathLike, *, verify: bool = True) -> dict:
    """Read and check a folder's manifest. ``verify`` re-hashes every listed file."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"exported model folder not found: {folder}")
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}; is it a ptuning-onnx export?")
    manifest = _read_object(path)
    if manifest.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path} is not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(f"{path} has format_version {version!r}; this version reads {FORMAT_VERSION}")
    task = manifest.get("task")
    if task not in TASK_GRAPHS:
        raise ManifestError(f"{path} names unknown task {task!r}")
    for graph in manifest.get("graphs", {}).values():
        _check_inside(folder, graph["file"])
        if graph.get("external_data") is not None:
            _check_inside(folder, graph["external_data"])
    for name in manifest.get("files") or {}:
        _check_inside(folder, name)
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ManifestError(f"{folder / MANIFEST_NAME} lists no files")
    for name, expected in files.items():
        path = _check_inside(folder, name)
        if not path.is_file():
            raise ManifestError(f"{path} is listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ManifestError(f"{path} was modified after export: sha256 {actual[:12]}... != {expected[:12]}...")


def _check_inside(folder: Path, name: str) -> Path:
    """A manifest is data from a file: never let it point outside its folder, by name or by a symlink (a graph's
    external weights are read by onnxruntime from the file the manifest names)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise ManifestError(f"manifest entry {name!r} points outside {folder}")
    path = folder / name
    if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
        raise ManifestError(f"{path} is a symlink to {path.resolve()}, outside {folder}; refusing to read it")
    return path


def graph_path(folder: Path, manifest: dict, graph: str) -> Path:
    try:
        return Path(folder) / manifest["graphs"][graph]["file"]
    except KeyError:
        raise ManifestError(f"manifest of {folder} has no graph {graph!r}") from None


def read_model_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ManifestError(f"{folder} has no config.json")
    return _read_object(path)


def _read_object(path: Path) -> dict:
    """A JSON object from ``path``; anything else is a ``ManifestError`` naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} must hold a JSON object")
    return data


def version_tuple(text: str) -> tuple:
    """``"1.22.0+cu12"`` -> ``(1, 22)``: major and minor, for minimum-version checks."""
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())
