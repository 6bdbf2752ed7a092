"""Training under what production meets: a loss that blows up stops the run with a typed error and leaves the last
good checkpoint byte for byte; a ``ptuning-train`` killed with SIGKILL (even inside a checkpoint write) resumes with
``--resume`` to exactly what an uninterrupted run writes.

The blow-ups are real: learning rates of 1e10 and 1e30 on the tiny GPT-2 overflow float32 within two steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MODELS
from ptuning_onnx.adapter import load_adapter
from ptuning_onnx.cli.train import main
from ptuning_onnx.errors import ConfigError, TrainingDivergedError
from ptuning_onnx.train import TrainArgs, train

REPO = Path(__file__).resolve().parents[1]
GPT2 = MODELS / "gpt2"


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def train_file(folder: Path, n: int) -> Path:
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"the cat number {i} sat on the mat"}) + "\n" for i in range(n)),
                    encoding="utf-8")
    return path


def args_for(folder: Path, output: str = "out", **kw) -> TrainArgs:
    base = dict(base_model=str(GPT2), task="causal-lm", train_file=str(train_file(folder, 8)),
                output=str(folder / output), num_virtual_tokens=4, batch_size=8, epochs=1, learning_rate=3e-2,
                seed=0, quiet=True)
    return TrainArgs(**dict(base, **kw))


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones too) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list:
    """Temporary or half-swapped folders of our atomic writes, anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def adapters_equal(a: Path, b: Path) -> None:
    expected, got = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert sorted(expected) == sorted(got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), (key, (expected[key] - got[key]).abs().max().item())
    log_a, log_b = (json.loads((f / "training_log.json").read_text()) for f in (a, b))
    assert log_a["steps"] == log_b["steps"]  # the same loss at every step, to the last bit


# ---- a loss, prompt or held-out loss that turns NaN/inf ---------------------------------------------------------

@pytest.mark.parametrize("kw,message", [
    # step 1 moves every weight by ~1e30, so step 2's forward overflows
    (dict(learning_rate=1e30, batch_size=4),
     r"at step 2 \(epoch 1\): the training loss is nan \(rows \d+, \d+, \d+, \d+ of .*train.jsonl\)"),
    # one step per epoch: the weights are finite, but the MLP's output (the prompt table) overflows
    (dict(learning_rate=1e30),
     r"at step 1 \(epoch 1\): the checkpoint's prompt table holds NaN or infinite values"),
    # the LSTM keeps the table finite (~1e23), but the base model cannot digest it
    (dict(learning_rate=1e10, encoder_type="lstm", eval_file=True),
     r"at the end of epoch 1 \(step 1\): the held-out loss is nan on .*train.jsonl"),
], ids=["loss", "prompt-table", "held-out-loss"])
def test_divergence_before_any_checkpoint_writes_nothing(tmp_path, kw, message):
    if kw.get("eval_file"):
        kw = dict(kw, eval_file=str(train_file(tmp_path, 8)))  # the training rows themselves
    args = args_for(tmp_path, epochs=3, **kw)
    with pytest.raises(TrainingDivergedError, match=message) as info:
        train(args)
    assert f"no checkpoint was written to {tmp_path / 'out'}" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]  # not even a temporary folder


def test_cli_divergence_exits_1_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--base-model", str(GPT2), "--task", "causal-lm", "--train-file", str(train_file(tmp_path, 8)),
            "--output", str(out), "--num-virtual-tokens", "4", "--batch-size", "8", "--encoder-type", "lstm",
            "--learning-rate", "1e10", "--seed", "0", "--quiet"]
    assert main(argv + ["--epochs", "1"]) == 0  # step 1: finite loss, finite weights, finite (huge) prompt table
    good = snapshot(out)
    assert "training_state/state.json" in good and torch.isfinite(load_adapter(out).prompt_embeddings).all()
    capsys.readouterr()

    assert main(argv + ["--epochs", "3", "--resume"]) == 1  # a failed run, not bad input (2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: training diverged at step 2 (epoch 2): the training loss is nan (rows 1, 2"), err
    assert f"{out} keeps the last good checkpoint (step 1); try a lower --learning-rate" in err
    assert snapshot(out) == good  # adapter, training_state/, log and plot: byte for byte
    assert leftovers(tmp_path) == []


def test_non_finite_learning_rate_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="learning_rate must be a finite number > 0, got inf"):
        args_for(tmp_path, learning_rate=math.inf)


# ---- a killed run resumes ------------------------------------------------------------------------------------

def test_sigkilled_cli_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    """A real ``ptuning-train`` process, killed with SIGKILL mid-run, then ``--resume``d in-process."""
    common = ["--base-model", str(GPT2), "--task", "causal-lm", "--train-file", str(train_file(tmp_path, 16)),
              "--num-virtual-tokens", "4", "--encoder-type", "lstm", "--encoder-dropout", "0.1", "--batch-size", "2",
              "--epochs", "3", "--save-steps", "4", "--learning-rate", "0.03", "--seed", "1"]
    total = 3 * 16 // 2
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(common + ["--output", str(straight), "--quiet"]) == 0

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "ptuning_onnx.cli.train", *common, "--output", str(killed),
                             "--quiet"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen, deadline = None, time.monotonic() + 300
        while seen is None and proc.poll() is None and time.monotonic() < deadline:
            try:  # the first checkpoint (step 4, mid-epoch); absent for an instant while a write swaps it in
                seen = json.loads((killed / "training_state" / "state.json").read_text())["step"]
            except (OSError, ValueError):
                time.sleep(0.005)
        assert seen is not None and proc.poll() is None, f"no checkpoint while running: {proc.stderr.read()!r}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    capsys.readouterr()
    assert main(common + ["--output", str(killed), "--resume"]) == 0
    resumed_from = capsys.readouterr().out.split("resuming from ")[1].split(",")[0]
    assert resumed_from.startswith(f"{killed}: step ")
    assert seen <= int(resumed_from.split()[-1]) < total  # from the checkpoint the kill left, not from scratch
    adapters_equal(straight, killed)
    assert leftovers(tmp_path) == []  # the killed writer's temporary folders were cleaned


@pytest.mark.parametrize("moment", ["after-carrying", "between-renames"])
def test_kill_inside_an_adapter_write_keeps_the_checkpoint(tmp_path, moment):
    """``save_adapter`` swaps the whole output folder: it first carries ``training_state/`` and the log into its
    temporary sibling, then renames twice. These are the two states a kill there leaves (built by hand: the window
    is a few renames wide); ``--resume`` must find the checkpoint and finish as an uninterrupted run."""
    straight = train(args_for(tmp_path, "straight", epochs=2))
    out = Path(train(args_for(tmp_path, epochs=1)).output)
    dead = subprocess.Popen([sys.executable, "-c", ""])  # a writer pid that is surely gone
    dead.wait()
    tmp = tmp_path / f".out.tmp-{dead.pid}-k1ll"
    tmp.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # the new adapter, fully written
        shutil.copy(out / name, tmp / name)
    for name in ("training_state", "training_log.json", "loss.png"):  # carried over, before the renames
        if (out / name).exists():
            os.replace(out / name, tmp / name)
    if moment == "between-renames":
        os.replace(out, tmp_path / f".out.old-{dead.pid}")
    assert not (out / "training_state").exists()

    resumed = train(args_for(tmp_path, epochs=2, resume=True))
    assert resumed.step == 2
    adapters_equal(Path(straight.output), out)
    assert leftovers(tmp_path) == []


def test_causal_lm_loss_of_a_padded_batch_is_the_rows_losses_alone(peft_adapters):
    """Each row's tokens, the first one included (scored from the last virtual token), count as when the row is
    alone: the batch loss is the token-weighted mean of the rows' own losses. Left padding (the control) scores a
    shorter row's first token from a pad position instead, and misses."""
    import torch

    from conftest import MODELS
    from ptuning_onnx.dataset import Example, collate
    from ptuning_onnx.export.exporter import load_reference
    from ptuning_onnx.train import padding_side

    model = load_reference(MODELS / "gpt2", peft_adapters["causal-lm"]).eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 900, (n,), generator=g).tolist() for n in (9, 4, 6)]
    examples = [Example(i, ids, list(ids)) for i, ids in enumerate(rows)]
    assert padding_side(model) == "right"
    with torch.no_grad():
        alone = [float(model(**collate([e], "CAUSAL_LM", pad_id=0))["loss"]) for e in examples]
        want = sum(loss * len(r) for loss, r in zip(alone, rows, strict=True)) / sum(map(len, rows))
        right = float(model(**collate(examples, "CAUSAL_LM", pad_id=0, padding_side="right"))["loss"])
        left = float(model(**collate(examples, "CAUSAL_LM", pad_id=0, padding_side="left"))["loss"])
    assert abs(right - want) < 1e-5 * max(1.0, want)
    assert abs(left - want) > 1e-3, (left, want)
