"""fp16 graphs for CUDA, made and checked on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import graph_io


def to_fp16(path: Path, external_data: Optional[bool]) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(graph_io.load(path), keep_io_types=False, disable_shape_infer=True)
    graph_io.save(model, path, external=external_data)
