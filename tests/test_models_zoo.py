"""Checks for the shipped tiny model zoo (models/) and the sentiment dataset."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
SENTIMENT = REPO / "ptuning_onnx" / "data" / "sentiment"
NAMES = ["gpt2", "llama", "bert", "t5"]
MAX_BYTES = 2 * 1024 * 1024
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}

# (pad, bos, eos, decoder_start, padding_side)
EXPECTED = {
    "gpt2": (1, 0, 0, None, "left"),
    "llama": (3, 1, 2, None, "left"),
    "bert": (0, None, None, None, "right"),
    "t5": (0, None, 1, 0, "right"),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("name", NAMES)
def test_model_folder_loads_offline(name):
    from transformers import AutoConfig, AutoTokenizer

    folder = MODELS / name
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= files
    assert not [f for f in files if Path(f).suffix in PICKLE_SUFFIXES]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < MAX_BYTES

    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert len(tok) == cfg.vocab_size

    pad, bos, eos, start, side = EXPECTED[name]
    assert tok.pad_token_id == cfg.pad_token_id == pad
    assert tok.eos_token_id == eos and getattr(cfg, "eos_token_id", None) == eos
    assert tok.bos_token_id == bos and getattr(cfg, "bos_token_id", None) == bos
    assert getattr(cfg, "decoder_start_token_id", None) == start
    assert tok.padding_side == side

    batch = tok(["hello world", "The food was great, but the service was slow!"], padding=True)
    ids = [i for row in batch["input_ids"] for i in row]
    assert ids and max(ids) < cfg.vocab_size and min(ids) >= 0
    if name == "bert":
        assert batch["input_ids"][0][0] == tok.cls_token_id
        assert "token_type_ids" in batch
    else:
        assert "token_type_ids" not in batch
    single = tok("hello world")["input_ids"]
    if name == "t5":
        assert single[-1] == tok.eos_token_id
    if name == "llama":
        assert single[0] == tok.bos_token_id
    if side == "left":
        assert batch["attention_mask"][0][0] == 0  # shorter row is left-padded


def test_rebuild_is_byte_identical(tmp_path):
    """tools/build_models.py reproduces the shipped weights and tokenizers exactly."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([sys.executable, str(REPO / "tools" / "build_models.py"), "--out", str(tmp_path)],
                   check=True, env=env, capture_output=True, timeout=120)

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    # config.json / generation_config.json embed the transformers version: compare parsed,
    # ignoring that key, so a library upgrade alone does not fail this test.
    for name in NAMES:
        for fname in ("model.safetensors", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json"):
            assert digest(tmp_path / name / fname) == digest(MODELS / name / fname), (name, fname)
        for fname in ("config.json", "generation_config.json"):
            shipped, rebuilt = MODELS / name / fname, tmp_path / name / fname
            assert shipped.exists() == rebuilt.exists(), (name, fname)
            if shipped.exists():
                a, b = (json.loads(p.read_text()) for p in (shipped, rebuilt))
                a.pop("transformers_version", None)
                b.pop("transformers_version", None)
                assert a == b, (name, fname)


def _read(split: str) -> list[dict]:
    with open(SENTIMENT / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_sentiment_dataset():
    train, test = _read("train"), _read("test")
    assert len(train) + len(test) >= 300
    assert len(test) >= 50
    for rows in (train, test):
        assert all(set(r) == {"text", "label"} for r in rows)
        assert all(isinstance(r["text"], str) and r["text"].strip() for r in rows)
        labels = [r["label"] for r in rows]
        assert set(labels) == {"positive", "negative"}
        assert labels.count("positive") == labels.count("negative")
        assert len({r["text"] for r in rows}) == len(rows)  # no duplicates within a split
    assert not {r["text"] for r in train} & {r["text"] for r in test}
