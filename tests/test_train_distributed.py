"""``ptuning-train`` under ``torchrun``: 2 processes on the CPU (gloo) against one process with the same global
batch, and a resume from the 2-process run's checkpoint. Real runs: the tiny BERT, an LSTM encoder with dropout
(the ranks' RNGs must stay in step) and a classifier head, micro-batches of 5 rows dealt 3 + 2 (uneven shares)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MODELS
from test_train import rows_for, write_jsonl

pytestmark = pytest.mark.usefixtures("torch_one_thread")
COMMON = ["--task", "seq-cls", "--num-virtual-tokens", "4", "--encoder-type", "lstm", "--encoder-num-layers", "2",
          "--encoder-dropout", "0.2", "--batch-size", "5", "--grad-accum", "2", "--learning-rate", "3e-2",
          "--seed", "0", "--device", "cpu", "--quiet"]


def _torchrun(args: list, tmp: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PTUNING_ONNX_LOG_DIR": str(tmp / "logs")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ptuning_onnx.cli.train", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _single(args: list) -> None:
    from ptuning_onnx.cli.train import main

    assert main(args) == 0


def _close(a: Path, b: Path) -> dict:
    """Per adapter tensor, max abs diff relative to the tensor's largest value; asserts the same keys. Relative,
    because AdamW divides by sqrt of tiny second moments: float-order noise of 1e-7 in a gradient grows to ~1e-5
    of the weights' scale after a few steps."""
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert sorted(x) == sorted(y) and "base_model.classifier.weight" in x
    return {k: float((x[k] - y[k]).abs().max() / x[k].abs().max()) for k in x}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(tmp / "train.jsonl", rows_for("seq-cls", 20))
    base = ["--base-model", str(MODELS / "bert"), "--train-file", str(data), *COMMON]
    _torchrun([*base, "--epochs", "2", "--output", str(tmp / "two")], tmp)
    _single([*base, "--epochs", "2", "--output", str(tmp / "one")])
    return tmp, base


def test_two_processes_equal_one_with_the_same_global_batch(runs):
    tmp, base = runs
    diffs = _close(tmp / "one", tmp / "two")
    assert max(diffs.values()) < 1e-4, diffs  # float summation order only
    one = json.loads((tmp / "one" / "training_log.json").read_text())["steps"]
    two = json.loads((tmp / "two" / "training_log.json").read_text())["steps"]
    assert [s["step"] for s in one] == [s["step"] for s in two]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two, strict=True)) < 1e-5
    # Negative control: another global batch (one process, 4 rows) trains to a different adapter.
    _single([*base, "--epochs", "2", "--output", str(tmp / "other"), "--batch-size", "4"])
    assert max(_close(tmp / "one", tmp / "other").values()) > 1e-2


def test_resume_from_the_two_process_checkpoint(runs):
    tmp, base = runs
    _torchrun([*base, "--epochs", "2", "--max-steps", "2", "--output", str(tmp / "split")], tmp)
    state = json.loads((tmp / "split" / "training_log.json").read_text())
    assert state["step"] == 2
    _single([*base, "--epochs", "2", "--resume", "--output", str(tmp / "split")])  # one process takes over
    assert json.loads((tmp / "split" / "training_log.json").read_text())["step"] == \
        json.loads((tmp / "one" / "training_log.json").read_text())["step"]
    assert max(_close(tmp / "one", tmp / "split").values()) < 1e-4


def test_world_from_env_and_sharding(monkeypatch):
    from ptuning_onnx import distributed as dist_
    from ptuning_onnx.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    world = dist_.from_env()
    assert (world.rank, world.size, world.local_rank, world.main) == (1, 3, 1, False)
    assert dist_.shard([10, 11, 12, 13, 14], world) == [11, 14]
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ConfigError, match="outside WORLD_SIZE 3"):
        dist_.from_env()
    assert torch.tensor(0).item() == 0
