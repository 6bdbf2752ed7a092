"""Weights that are rebuilt from a seed instead of travelling: numpy and safetensors only (no torch).

A 125M model is 500 MB of fp32; the GPU machine takes 60 MiB a call. So the benchmark-shaped models of the GPU
check get weights that either machine can regenerate bit for bit: each tensor is drawn from numpy's legacy
``RandomState`` (its streams are frozen across numpy versions, NEP 19), seeded from the model's seed and the
tensor's name, then scaled in float32. Norm weights stay ones and biases zeros, as transformers initialises them.

The GPU side rebuilds ``model.safetensors`` for PEFT and every exported tensor that is one of these weights (as is,
transposed, or cast to fp16 the way onnxruntime's converter casts). The manifest's sha256 of every rebuilt file
then proves the rebuild exact.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

SPEC_NAME = "weights_spec.json"


def seeded(seed: int, name: str, shape: list, init: str, std: float) -> np.ndarray:
    if init == "ones":
        return np.ones(shape, np.float32)
    if init == "zeros":
        return np.zeros(shape, np.float32)
    rng = np.random.RandomState(zlib.crc32(f"{seed}:{name}".encode()))
    return rng.standard_normal(int(np.prod(shape))).astype(np.float32).reshape(shape) * np.float32(std)


def spec_from(tensors: dict, seed: int, std: float) -> dict:
    """The spec of a state dict: each tensor's shape and whether it is ones, zeros or seeded normal."""
    entries = {}
    for name, value in sorted(tensors.items()):
        if value.dtype != np.float32:
            raise ValueError(f"{name}: only float32 weights can be seeded, got {value.dtype}")
        init = "ones" if np.all(value == 1) else "zeros" if not np.any(value) else "normal"
        entries[name] = {"shape": list(value.shape), "init": init}
    return {"seed": seed, "std": std, "tensors": entries}


def regenerate(spec: dict) -> dict:
    return {name: seeded(spec["seed"], name, e["shape"], e["init"], spec["std"])
            for name, e in spec["tensors"].items()}


def reseed_folder(folder: Path, seed: int, std: float) -> dict:
    """Replace ``folder/model.safetensors`` (as transformers saved it) with seeded weights; writes the spec."""
    from safetensors.numpy import load_file, save_file

    spec = spec_from(load_file(folder / "model.safetensors"), seed, std)
    save_file(regenerate(spec), folder / "model.safetensors", metadata={"format": "pt"})
    (folder / SPEC_NAME).write_text(json.dumps(spec, indent=1, sort_keys=True))
    return spec


def rebuild_folder(folder: Path) -> dict:
    """On the GPU side: ``model.safetensors`` from ``folder/weights_spec.json``; returns the tensors."""
    from safetensors.numpy import save_file

    tensors = regenerate(json.loads((folder / SPEC_NAME).read_text()))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return tensors
