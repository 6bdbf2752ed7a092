"""Reading and writing ONNX graphs of any size: one ``<graph>.onnx``, and beside it at most one ``<graph>.onnx.data``.

Protobuf cannot serialize more than 2 GiB, so a 1.1B-parameter fp32 graph (4.4 GB) must keep its weights in ONNX
external data. torch's TorchScript exporter then writes one file per tensor (hundreds of them); ``finalize``
streams them into the single data file, one tensor at a time, so the weights are never all in memory at once.
Offsets in the data file are page-aligned, which lets onnxruntime map the weights instead of copying them.

Every pass (fp16, optimization, quantization) reads with ``load`` and writes with ``save``, which picks external
data by size (or as asked), so that the same code serves a 5 MB test model and an 8B production model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

from ..errors import ExportError

# Above this many bytes of tensors a graph goes to external data. protobuf's hard limit is 2 GiB for the whole
# message, but well below it external data already pays: onnxruntime parses and copies weights held inside the
# protobuf (peak RSS ~2x the weights) and maps page-aligned external ones. Llama-125M int4 (162 MB): session
# 0.36 -> 0.14 s, peak RSS 305 -> 156 MB, as onnxruntime-genai's own folder. Small test models stay one file.
EXTERNAL_THRESHOLD = 1 << 26
PROTOBUF_LIMIT = (1 << 31) - (1 << 24)
ALIGN = 1 << 16  # offsets in the data file: a multiple of the largest page size onnxruntime maps with
SIZE_THRESHOLD = 1024  # smaller tensors (shapes, scalars) stay inside the graph, as onnx.save does


def data_name(graph: Path) -> str:
    """``model.onnx`` -> ``model.onnx.data``: the one data file a graph may have."""
    return Path(graph).name + ".data"


def _tensors(model) -> Iterator:
    """Every TensorProto that may carry weights: initializers and Constant nodes' values, subgraphs included."""
    from onnx import AttributeProto

    def walk(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g)

    yield from walk(model.graph)


def _external(tensor) -> Optional[dict]:
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in tensor.external_data}


def _nbytes(tensor, folder: Optional[Path]) -> int:
    info = _external(tensor)
    if info is None:
        return len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()
    if "length" in info:
        return int(info["length"])
    # torch writes one file per tensor and no length: the whole file is the tensor.
    return os.path.getsize(_inside(folder, info["location"])) if folder is not None else 0


def tensor_bytes(model, folder: Optional[Path] = None) -> int:
    """Bytes of weights in ``model``, those in external files included when ``folder`` is given."""
    return sum(_nbytes(t, folder) for t in _tensors(model))


def external_locations(model) -> set:
    return {info["location"] for t in _tensors(model) if (info := _external(t)) is not None}


def is_external(path: Path) -> bool:
    return (Path(path).parent / data_name(path)).exists()


def load(path: Path, *, data: bool = True):
    """The graph at ``path``; with ``data=False`` its structure only (external weights stay on disk)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=data)
    except Exception as exc:
        raise ExportError(f"cannot read ONNX graph {Path(path).name}: {type(exc).__name__}: {exc}") from None


def save(model, path: Path, *, external: Optional[bool] = None) -> None:
    """Write ``model`` (weights in memory) to ``path``; weights go to ``<path>.data`` when ``external`` is True,
    or, with ``external=None``, when they are over ``EXTERNAL_THRESHOLD``. Replaces an earlier data file."""
    import onnx

    path = Path(path)
    if external is None:
        external = tensor_bytes(model) > EXTERNAL_THRESHOLD
    data = path.parent / data_name(path)
    if data.exists():
        data.unlink()
    if external:
        # Ours rather than onnx.save's external writer: page-aligned offsets (see ALIGN).
        with open(data, "wb") as fh:
            for tensor in _tensors(model):
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= SIZE_THRESHOLD:
                    _append(fh, tensor, tensor.raw_data, data.name)
    onnx.save_model(model, str(path))


def _append(fh, tensor, payload: bytes, location: str) -> None:
    from onnx import TensorProto

    offset = -fh.tell() % ALIGN
    if offset:
        fh.write(b"\0" * offset)
    start = fh.tell()
    fh.write(payload)
    _point(tensor, location, start, len(payload))
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL


def _point(tensor, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def finalize(path: Path, *, defaults: Optional[dict] = None, external: Optional[bool] = None) -> None:
    """Bring a freshly traced graph into the folder's form: optional-input defaults added (an initializer named
    like the input), and its weights either inside the graph or in ONE ``<graph>.onnx.data``.

    Streams: tensors that torch wrote as separate files are copied into the data file one at a time and their
    files removed, so peak memory is one tensor, not the model."""
    import numpy as np
    from onnx import numpy_helper

    path = Path(path)
    folder = path.parent
    model = load(path, data=False)
    for name, value in (defaults or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    sources = external_locations(model)
    for location in sources:
        _inside(folder, location)
    size = tensor_bytes(model, folder)
    if external is None:
        external = size > EXTERNAL_THRESHOLD
    elif not external and size > PROTOBUF_LIMIT:
        raise ExportError(f"{path.name} holds {size / 2**30:.1f} GiB of weights, over protobuf's 2 GiB limit; "
                          "it needs external data (leave external_data at its default)")
    if not sources and not external:
        save(model, path, external=False)
        return
    if not external:  # small enough: pull torch's per-tensor files back into the graph
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(folder))
        save(model, path, external=False)
        _remove(folder, sources)
        return
    target = folder / data_name(path)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as fh:
        for tensor in _tensors(model):
            info = _external(tensor)
            if info is not None:
                with open(folder / info["location"], "rb") as src:
                    src.seek(int(info.get("offset", 0)))
                    length = int(info["length"]) if "length" in info else -1
                    payload = src.read(length)
                _append(fh, tensor, payload, target.name)
                del payload
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= SIZE_THRESHOLD:
                _append(fh, tensor, tensor.raw_data, target.name)
    os.replace(partial, target)
    import onnx

    onnx.save_model(model, str(path))
    _remove(folder, sources - {target.name})


def move(src: Path, dst: Path) -> None:
    """Rename a graph and its data file, pointing its tensors at the new data file name."""
    src, dst = Path(src), Path(dst)
    model = load(src, data=False)
    locations = external_locations(model)
    if not locations:
        os.replace(src, dst)
        stale = dst.parent / data_name(dst)
        if stale.exists():  # the replaced graph's weights, which no graph points at any more
            stale.unlink()
        return
    if locations != {data_name(src)}:
        raise ExportError(f"{src.name} keeps its weights in {sorted(locations)}; expected {data_name(src)} only")
    for tensor in _tensors(model):
        if _external(tensor) is not None:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_name(dst)
    import onnx

    os.replace(src.parent / data_name(src), dst.parent / data_name(dst))
    onnx.save_model(model, str(dst))
    if src != dst:
        src.unlink()


def _inside(folder: Path, location: str) -> Path:
    path = (folder / location)
    if os.path.isabs(location) or ".." in Path(location).parts or not path.resolve().is_relative_to(folder.resolve()):
        raise ExportError(f"external data location {location!r} leaves the folder {folder}")
    return path


def _remove(folder: Path, locations) -> None:
    for location in locations:
        path = _inside(folder, location)
        if path.is_file():
            path.unlink()
