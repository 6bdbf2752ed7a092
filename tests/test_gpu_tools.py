"""tools/gpu on the CPU: the parts that must be right before a GPU lease starts (pack, reassemble, rebuild, the
onnxruntime-gpu trim) and the fp16 rule that keeps RMSNorm statistics in fp32."""

from __future__ import annotations

import importlib
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import MODELS, ROOT

GPU = ROOT / "tools" / "gpu"
sys.path.insert(0, str(GPU))

import pack  # noqa: E402
import trim_ort  # noqa: E402
import weights  # noqa: E402


def _run(*args, ok=True):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if ok:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """tools/gpu/build.py (tiny GPT-2, fp32 and fp16) and pack.py without onnxruntime, in parts of 0.25 MiB."""
    root = tmp_path_factory.mktemp("gpu-pack")
    _run(GPU / "build.py", "--work", root / "work", "--only", "tiny-gpt2")
    _run(GPU / "pack.py", "--work", root / "work", "--out", root / "parts", "--part-mib", "0.25")
    return root


def test_pack_and_unpack_rebuild_every_file_bit_for_bit(packed, tmp_path):
    listing = json.loads((packed / "parts" / "parts.json").read_text())
    assert len(listing["parts"]) >= 2, listing  # several parts, reassembled in order
    _run(GPU / "unpack.py", "--parts", packed / "parts", "--dest", tmp_path)
    exports = sorted((packed / "work" / "exports").rglob("*"))
    assert any(p.name.endswith(".onnx.data") for p in exports)
    for original in exports:
        if original.is_file():
            rebuilt = tmp_path / "work" / original.relative_to(packed / "work")
            assert rebuilt.read_bytes() == original.read_bytes(), original
    # the weights travelled as recipes over the repo's models/gpt2, not as bytes
    with __import__("tarfile").open(_reassembled(packed), "r:xz") as tar:
        recipes = json.load(tar.extractfile("recipes.json"))
    described = [e for d in recipes["data_files"].values() for e in d["tensors"] if e[2] != "residual"]
    assert described and {e[2] for e in described} == {"repo:models/gpt2"}
    assert {e[4] for e in described} >= {"id", "fp16"}


def _reassembled(packed):
    return packed / "parts" / json.loads((packed / "parts" / "parts.json").read_text())["archive"]


def test_a_damaged_or_missing_part_stops_the_unpack(packed, tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    for f in (packed / "parts").glob("core.part*"):
        (parts / f.name).write_bytes(f.read_bytes())
    (parts / "parts.json").write_text((packed / "parts" / "parts.json").read_text())
    part = parts / "core.part01"
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    done = _run(GPU / "unpack.py", "--parts", parts, "--dest", tmp_path / "d", ok=False)
    assert done.returncode == 1 and "core.part01: sha256 mismatch" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    part.unlink()
    done = _run(GPU / "unpack.py", "--parts", parts, "--dest", tmp_path / "d", ok=False)
    assert done.returncode == 1 and "core.part01 is missing" in done.stderr


def test_fp16_cast_matches_onnxruntimes_converter_on_edge_values():
    from onnxruntime.transformers.float16 import convert_np_to_float16

    edge = np.array([0.0, -0.0, 1e-9, -1e-9, 5.9e-8, 6e-8, 1e-5, 0.1, 65504.0, 70000.0, -1e6, np.inf, -np.inf,
                     np.nan, 3.14159], np.float32)
    values = np.concatenate([edge, np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 0.02])
    assert pack.as_fp16(values).tobytes() == convert_np_to_float16(values).tobytes()


def test_seeded_weights_are_reproducible_and_differ_by_name():
    a = weights.seeded(0, "h.0.w", [64, 32], "normal", 0.02)
    assert a.dtype == np.float32 and a.tobytes() == weights.seeded(0, "h.0.w", [64, 32], "normal", 0.02).tobytes()
    assert not np.array_equal(a, weights.seeded(0, "h.1.w", [64, 32], "normal", 0.02))
    assert not np.array_equal(a, weights.seeded(1, "h.0.w", [64, 32], "normal", 0.02))
    assert abs(float(a.std()) - 0.02) < 0.002
    # numpy's legacy RandomState stream is frozen across versions (NEP 19): this first value must never move
    assert float(np.random.RandomState(0).standard_normal()) == 1.764052345967664


def _elf_with_fatbin(entries) -> bytearray:
    """A minimal ELF64 with a .shstrtab and a .nv_fatbin section holding one fatbin of ``(sm, payload)`` ELF
    entries, laid out as the CUDA provider's are (64-byte entry headers, the architecture at offset 28)."""
    body = b""
    for sm, payload in entries:
        header = struct.pack("<HHIQ", 2, 0x101, 64, len(payload)) + bytes(12) + struct.pack("<I", sm) + bytes(32)
        body += header + payload
    fatbin = struct.pack("<IHHQ", trim_ort.FATBIN_MAGIC, 1, 16, len(body)) + body
    names = b"\0.shstrtab\0.nv_fatbin\0"
    data_start = 64
    shoff = data_start + len(names) + len(fatbin)
    elf = bytearray(64)
    elf[0:4] = b"\x7fELF"
    struct.pack_into("<Q", elf, 0x28, shoff)
    struct.pack_into("<HHH", elf, 0x3A, 64, 3, 1)
    elf += names + fatbin
    sections = [(0, 0, 0), (1, data_start, len(names)), (11, data_start + len(names), len(fatbin))]
    for name, offset, size in sections:
        elf += struct.pack("<IIQQQQ", name, 1, 0, 0, offset, size) + bytes(24)
    return elf


def test_trim_zeroes_other_architectures_and_keeps_the_layout():
    sm80, sm90 = b"\xab" * 40, b"\xcd" * 24
    elf = _elf_with_fatbin([(80, sm80), (90, sm90)])
    before = bytes(elf)
    counts = trim_ort.trim_fatbins(elf, {90})
    assert counts["kept"] == 1 and counts["zeroed"] == 1 and len(elf) == len(before)
    assert sm90 in elf and sm80 not in elf
    changed = [i for i in range(len(elf)) if elf[i] != before[i]]
    assert len(changed) == len(sm80)  # the sm 80 payload only: headers, sizes and sections untouched
    with pytest.raises(ValueError, match="no kernels for sm"):
        trim_ort.trim_fatbins(bytearray(before), {100})


# ------------------------------------------------------------------ fp16: RMSNorm statistics stay fp32

def test_rmsnorm_statistics_are_found_in_llama_and_nowhere_else(exports):
    import onnx

    fp16 = importlib.import_module("ptuning_onnx.export.fp16")
    llama = onnx.load(str(exports["causal-lm-llama"] / "model.onnx"))
    found = fp16.norm_statistics_nodes(llama.graph)
    layers = json.loads((MODELS / "llama" / "config.json").read_text())["num_hidden_layers"]
    assert len(found) == 5 * (2 * layers + 1)  # Pow ReduceMean Add Sqrt Div, per norm: 2 a layer + the final one
    for task in ("causal-lm", "seq-cls"):  # GPT-2 and BERT: LayerNormalization ops, and GPT-2's GELU Pow(x, 3)
        model = onnx.load(str(exports[task] / "model.onnx"))
        assert fp16.norm_statistics_nodes(model.graph) == []


def test_fp16_llama_computes_rmsnorm_statistics_in_fp32(exports, tmp_path):
    import onnx

    fp16 = importlib.import_module("ptuning_onnx.export.fp16")
    target = tmp_path / "model.onnx"
    model = onnx.load(str(exports["causal-lm-llama"] / "model.onnx"))
    onnx.save(model, str(target))
    names = set(fp16.norm_statistics_nodes(model.graph))
    fp16.to_fp16(target, external_data=False)
    converted = onnx.load(str(target))
    casts = {n.output[0]: n for n in converted.graph.node if n.op_type == "Cast"}
    statistics = [n for n in converted.graph.node if n.name in names]
    assert len(statistics) == len(names)
    for node in statistics:  # every input from outside the chain arrives as fp32 ...
        for i, name in enumerate(node.input):
            if name in casts and not (node.op_type == "ReduceMean" and i > 0):
                assert casts[name].attribute[0].i == onnx.TensorProto.FLOAT, (node.name, name)
    outside = [n for n in statistics if n.op_type == "Pow"]
    assert all(n.input[0] in casts for n in outside)
    divs = {n.output[0] for n in statistics if n.op_type == "Div"}  # ... and the result goes back as fp16
    back = [n for n in converted.graph.node if n.op_type == "Cast" and n.input[0] in divs]
    assert len(back) == len(divs) and all(n.attribute[0].i == onnx.TensorProto.FLOAT16 for n in back)
    matmuls = [n for n in converted.graph.node if n.op_type == "MatMul"]
    inits = {i.name: i for i in converted.graph.initializer}
    weights16 = [inits[i] for n in matmuls for i in n.input if i in inits]
    assert weights16 and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights16)  # the rest is fp16

