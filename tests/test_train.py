"""Training: loss goes down on every task, resume is exact, bad data fails early, the CLI never shows a traceback,
and the adapter we write gives PEFT's logits."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ptuning_onnx.adapter import load_adapter
from ptuning_onnx.config import TaskType
from ptuning_onnx.errors import ConfigError, DataError
from ptuning_onnx.reference import PTuningModel, load_base
from ptuning_onnx.train import TrainArgs, epoch_order, train

REPO = Path(__file__).resolve().parents[1]
POS = ["great", "good", "lovely", "excellent", "fun", "superb"]
NEG = ["bad", "awful", "boring", "poor", "dull", "terrible"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """``model_dir(name)``: the shipped tiny model, or one built by tools/build_models.py if it is not there."""
    built = {}

    def get(name: str) -> Path:
        shipped = REPO / "models" / name
        if (shipped / "config.json").is_file() and (shipped / "model.safetensors").is_file():
            return shipped
        if name not in built:
            spec = importlib.util.spec_from_file_location("build_models", REPO / "tools" / "build_models.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            out = tmp_path_factory.mktemp("models")
            assert module.main(["--out", str(out), "--only", name]) == 0
            built[name] = out / name
        return built[name]

    return get


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_for(task: str, n: int = 16) -> list:
    words = [(w, 1) for w in POS] + [(w, 0) for w in NEG]
    if task == "seq-cls":
        return [{"text": f"the film was {words[i % 12][0]}", "label": ["negative", "positive"][words[i % 12][1]]}
                for i in range(n)]
    if task == "token-cls":
        return [{"tokens": [words[(i + k) % 12][0] for k in range(4)],
                 "labels": ["NP"[words[(i + k) % 12][1]] for k in range(4)]} for i in range(n)]
    if task == "seq2seq-lm":
        return [{"source": f"the film was {words[i % 12][0]}", "target": ["negative", "positive"][words[i % 12][1]]}
                for i in range(n)]
    return ([{"text": "the cat sat on the mat"}] * (n // 2)
            + [{"prompt": "the film was", "completion": f" {w}"} for w in POS[: n - n // 2]])


def args_for(tmp_path: Path, model: Path, task: str, rows: list, **kw) -> TrainArgs:
    train_file = write_jsonl(tmp_path / f"{task}-train.jsonl", rows)
    base = dict(base_model=str(model), task=task, train_file=str(train_file), output=str(tmp_path / "out"),
                eval_file=str(train_file), num_virtual_tokens=4, epochs=3, batch_size=8, learning_rate=3e-2,
                quiet=True, seed=0)
    base.update(kw)
    return TrainArgs(**base)


def tensors(folder) -> dict:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


# ---- training lowers the loss -----------------------------------------------------------------------------

@pytest.mark.parametrize("task,model,epochs", [("causal-lm", "gpt2", 3), ("causal-lm", "llama", 2),
                                               ("seq-cls", "bert", 4), ("seq-cls", "llama", 3),
                                               ("token-cls", "bert", 3), ("seq2seq-lm", "t5", 3)])
def test_training_lowers_loss(tmp_path, model_dir, task, model, epochs):
    args = args_for(tmp_path, model_dir(model), task, rows_for(task), epochs=epochs)
    result = train(args)
    before, after = result.evals[0], result.evals[-1]
    assert [e["epoch"] for e in result.evals] == list(range(epochs + 1))
    assert after["loss"] < before["loss"] - 0.02, result.evals
    assert result.step == len(result.steps) == epochs * 2
    out = Path(args.output)
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_log.json", "loss.png",
                 "training_state/state.json"):
        assert (out / name).is_file(), name
    log = json.loads((out / "training_log.json").read_text())
    assert log["seed"] == 0 and log["args"]["task"] == task and len(log["steps"]) == result.step
    adapter = load_adapter(out)
    assert adapter.prompt_embeddings.shape[0] == 4 * (2 if task == "seq2seq-lm" else 1)
    if task in ("seq-cls", "token-cls"):
        assert adapter.head_weights and adapter.labels == (["negative", "positive"] if task == "seq-cls"
                                                           else ["N", "P"])


def test_mixed_precision_and_grad_accum_run(tmp_path, model_dir):
    """bf16 autocast on CPU trains; grad-accum 2 x batch 4 makes as many optimizer steps as batch 8."""
    args = args_for(tmp_path, model_dir("bert"), "seq-cls", rows_for("seq-cls"), batch_size=4, grad_accum=2,
                    mixed_precision=True, epochs=2)
    result = train(args)
    assert result.step == 4 and all(torch.isfinite(torch.tensor(s["loss"])) for s in result.steps)


def test_grad_accum_matches_a_big_batch(tmp_path, model_dir):
    # Same data order (one permutation cut into consecutive chunks), same equal-size mean losses.
    rows = rows_for("seq-cls")
    big = train(args_for(tmp_path / "a", model_dir("bert"), "seq-cls", rows, batch_size=8, epochs=2))
    small = train(args_for(tmp_path / "b", model_dir("bert"), "seq-cls", rows, batch_size=4, grad_accum=2, epochs=2))
    for key, value in tensors(big.output).items():
        assert torch.allclose(value, tensors(small.output)[key], atol=1e-5), key


# ---- determinism and resume -------------------------------------------------------------------------------

def test_epoch_order_depends_only_on_seed_and_epoch():
    assert epoch_order(10, 3, 5, 1) == epoch_order(10, 3, 5, 1)
    assert epoch_order(10, 3, 5, 1) != epoch_order(10, 3, 5, 2)
    assert sorted(i for b in epoch_order(10, 3, 5, 1) for i in b) == list(range(10))


def test_same_seed_same_result_and_other_seed_differs(tmp_path, model_dir):
    rows = rows_for("causal-lm")
    runs = [train(args_for(tmp_path / str(i), model_dir("gpt2"), "causal-lm", rows, seed=seed, epochs=1,
                           encoder_type="lstm", encoder_num_layers=2, encoder_dropout=0.2))
            for i, seed in enumerate([7, 7, 8])]
    a, b, c = (tensors(r.output)["prompt_embeddings"] for r in runs)
    assert torch.equal(a, b)
    assert [s["loss"] for s in runs[0].steps] == [s["loss"] for s in runs[1].steps]
    assert not torch.allclose(a, c, atol=1e-3)  # negative control: the seed matters


@pytest.mark.parametrize("first", [dict(epochs=1), dict(epochs=2, max_steps=3)], ids=["epoch-boundary", "mid-epoch"])
def test_resume_equals_uninterrupted(tmp_path, model_dir, first):
    """LSTM with dropout and a classifier head: exercises the RNG, optimizer and head restore."""
    rows = rows_for("seq-cls", 20)
    common = dict(encoder_type="lstm", encoder_num_layers=2, encoder_dropout=0.2, batch_size=4, grad_accum=2)
    straight = train(args_for(tmp_path / "straight", model_dir("bert"), "seq-cls", rows, epochs=2, **common))
    split_args = args_for(tmp_path / "split", model_dir("bert"), "seq-cls", rows, **dict(common, **first))
    partial = train(split_args)
    assert partial.step < straight.step
    resumed = train(args_for(tmp_path / "split", model_dir("bert"), "seq-cls", rows, epochs=2, resume=True, **common))
    assert resumed.step == straight.step == 6 and resumed.epoch == 2
    expected, got = tensors(straight.output), tensors(resumed.output)
    assert sorted(expected) == sorted(got) and "base_model.classifier.weight" in got
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert resumed.steps == straight.steps and resumed.evals == straight.evals
    log = json.loads((Path(resumed.output) / "training_log.json").read_text())
    assert log["steps"] == straight.steps


def test_resume_refusals(tmp_path, model_dir):
    rows = rows_for("seq-cls")
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        train(args_for(tmp_path, model_dir("bert"), "seq-cls", rows, resume=True))
    train(args_for(tmp_path, model_dir("bert"), "seq-cls", rows, epochs=1))
    with pytest.raises(ConfigError, match="already holds a training checkpoint"):
        train(args_for(tmp_path, model_dir("bert"), "seq-cls", rows, epochs=1))
    with pytest.raises(ConfigError, match="--learning-rate was 0.03 in the checkpoint"):
        train(args_for(tmp_path, model_dir("bert"), "seq-cls", rows, epochs=2, resume=True, learning_rate=0.1))
    with pytest.raises(ConfigError, match="differs from the training file"):
        train(args_for(tmp_path, model_dir("bert"), "seq-cls", rows[:-1], epochs=2, resume=True))


# ---- bad data fails before training, naming file and row --------------------------------------------------

LONG = list(range(5, 125))  # 120 ids; with 20 virtual tokens that is 140 > 128
BAD = [
    ("seq-cls", [{"text": "good", "label": "a"}, {"text": "bad"}], None, r"row 2: missing field 'label'"),
    ("seq-cls", [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}],
     [{"text": "ok", "label": "a"}, "", {"text": "meh", "label": "neutral"}],
     r"eval.jsonl: row 3: unknown label 'neutral'"),
    ("seq-cls", [], None, r"train.jsonl: file is empty"),
    ("seq-cls", ["  ", "\n"], None, r"file is empty"),
    ("seq-cls", [{"text": "good", "label": "a"}, '{"text": "bad", "label": '], None, r"row 2: invalid JSON"),
    ("seq-cls", [{"text": "good", "label": "a"}, [1, 2]], None, r"row 2: expected a JSON object"),
    ("seq-cls", [{"text": "good", "label": "a"}, {"text": "bad", "label": 1}], None, r"row 2: .* mixes strings"),
    ("seq-cls", [{"text": "good", "label": "a"}, {"text": "bad", "label": "a"}], None, r"at least 2 distinct labels"),
    ("causal-lm", [{"text": "fine"}, {"input_ids": LONG}], None,
     r"row 2: 120 tokens \+ 20 virtual tokens = 140 > model limit 128"),
    ("causal-lm", [{"input_ids": [5, 1000]}], None, r"row 1: 'input_ids'\[1\] = 1000 is outside the vocabulary"),
    ("causal-lm", [{"input_ids": [5, -1]}], None, r"row 1: 'input_ids'\[1\] = -1 is outside the vocabulary"),
    ("causal-lm", [{"input_ids": [5, "x"]}], None, r"row 1: 'input_ids'\[1\] is 'x', not an integer"),
    ("causal-lm", [{"txt": "hello"}], None, r"row 1: missing field 'text'"),
    ("causal-lm", [{"prompt": "hello"}], None, r"row 1: missing field 'completion'"),
    ("token-cls", [{"tokens": ["a", "b"], "labels": ["X"]}], None, r"row 1: 2 tokens but 1 labels"),
    ("seq2seq-lm", [{"source": "a b"}], None, r"row 1: missing field 'target'"),
    ("seq2seq-lm", [{"input_ids": [5, 6], "target_ids": [7, 1000]}], None, r"row 1: 'target_ids'\[1\] = 1000"),
]


@pytest.mark.parametrize("task,train_rows,eval_rows,message", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_data_names_the_row(tmp_path, model_dir, task, train_rows, eval_rows, message):
    model = {"causal-lm": "gpt2", "seq2seq-lm": "t5"}.get(task, "bert")
    train_file = write_jsonl(tmp_path / "train.jsonl", train_rows)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", eval_rows) if eval_rows is not None else None
    args = TrainArgs(base_model=str(model_dir(model)), task=task, train_file=str(train_file),
                     eval_file=str(eval_file) if eval_file else None, output=str(tmp_path / "out"), quiet=True)
    with pytest.raises(DataError, match=message):
        train(args)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_base_without_tokenizer_trains_from_ids(tmp_path, model_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir("gpt2") / name, bare / name)
    rows = [{"input_ids": [5 + i, 9, 12, 40 + i]} for i in range(8)]
    result = train(args_for(tmp_path, bare, "causal-lm", rows, epochs=2))
    assert result.step == 2
    with pytest.raises(DataError, match="row 1: has text but the base model folder has no tokenizer files"):
        train(args_for(tmp_path / "t", bare, "causal-lm", [{"text": "hello"}]))


# ---- CLI ----------------------------------------------------------------------------------------------------

def test_cli_defaults_match_train_args():
    from ptuning_onnx.cli.train import DEFAULTS

    defaults = {f.name: f.default for f in fields(TrainArgs) if f.name in DEFAULTS}
    assert defaults == DEFAULTS


def test_cli_trains(tmp_path, model_dir, capsys):
    from ptuning_onnx.cli.train import main

    train_file = write_jsonl(tmp_path / "t.jsonl", rows_for("seq-cls"))
    out = tmp_path / "out"
    argv = ["--base-model", str(model_dir("bert")), "--task", "seq-cls", "--train-file", str(train_file),
            "--eval-file", str(train_file), "--output", str(out), "--num-virtual-tokens", "4", "--epochs", "1",
            "--batch-size", "8", "--seed", "3"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "before training" in captured.out and "held-out accuracy" in captured.out
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "labels.json").read_text())["labels"] == ["negative", "positive"]


@pytest.mark.parametrize("case", ["missing-file", "missing-base", "bad-row", "no-resume", "bad-number", "cuda"])
def test_cli_errors_are_one_line(tmp_path, model_dir, capsys, case):
    from ptuning_onnx.cli.train import main

    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    train_file = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": "a"}, {"text": "y"}])
    argv = ["--base-model", str(model_dir("bert")), "--task", "seq-cls", "--train-file", str(train_file),
            "--output", str(tmp_path / "out"), "--quiet"]
    extra = {"missing-file": ["--train-file", str(tmp_path / "nope.jsonl")], "bad-row": [],
             "missing-base": ["--base-model", str(tmp_path / "nobase")], "no-resume": ["--resume"],
             "bad-number": ["--batch-size", "0"], "cuda": ["--device", "cuda"]}[case]
    expected = {"missing-file": "data file not found", "bad-row": "row 2: missing field 'label'",
                "missing-base": "is not a model folder (no config.json)",
                "no-resume": "holds no checkpoint", "bad-number": "batch_size must be a positive integer",
                "cuda": "no CUDA device is available"}[case]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and expected in err[-1]
    assert not any("Traceback" in line for line in err)


def test_cli_usage_error_returns_2(capsys):
    from ptuning_onnx.cli.train import main

    assert main(["--task", "seq-cls"]) == 2
    assert "required" in capsys.readouterr().err


def test_cli_help_subprocess_and_torch_free_import():
    out = subprocess.run([sys.executable, "-m", "ptuning_onnx.cli.train", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0 and "--base-model" in out.stdout and "--mixed-precision" in out.stdout
    check = "import sys, ptuning_onnx.cli.train, ptuning_onnx.cli._common; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], cwd=REPO, timeout=120).returncode == 0


# ---- the written adapter is PEFT's format and gives PEFT's logits -------------------------------------------

@pytest.mark.parametrize("task,model", [("seq-cls", "bert"), ("causal-lm", "gpt2")])
def test_adapter_loads_in_peft_with_same_logits(tmp_path, model_dir, task, model):
    import transformers
    from peft import PeftModel

    folder = model_dir(model)
    result = train(args_for(tmp_path, folder, task, rows_for(task), epochs=1))
    adapter = load_adapter(result.output)
    task_type = TaskType.SEQ_CLS if task == "seq-cls" else TaskType.CAUSAL_LM
    ours = PTuningModel.from_adapter(load_base(folder, task_type, labels=adapter.labels), adapter).eval()
    auto = transformers.AutoModelForSequenceClassification if task == "seq-cls" else transformers.AutoModelForCausalLM
    kwargs = {"num_labels": 2} if task == "seq-cls" else {}
    peft_model = PeftModel.from_pretrained(auto.from_pretrained(str(folder), **kwargs), str(result.output)).eval()

    torch.manual_seed(0)
    ids = torch.randint(5, 900, (3, 7))  # unpadded rows: where PEFT and the batch-invariant reference agree
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = ours(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        if task == "causal-lm":
            expected = expected[:, adapter.num_virtual_tokens:]  # PEFT keeps the virtual positions
        assert (expected - got).abs().max().item() <= 1e-5
        # Negative control: a perturbed prompt must fail the same tolerance. (Random, because a constant shift of
        # every dimension is removed by LayerNorm and changes nothing.)
        ours.table += 1e-2 * torch.randn_like(ours.table)
        perturbed = ours(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert (expected - perturbed).abs().max().item() > 1e-5


def test_interrupted_atomic_update_is_recovered(tmp_path):
    """A kill between atomic_update's two renames leaves only `.name.old-PID`; loading puts it back."""
    from ptuning_onnx.adapter import Adapter, load_adapter, save_adapter
    from ptuning_onnx.config import PromptEncoderConfig

    cfg = PromptEncoderConfig(num_virtual_tokens=2, token_dim=4, task_type="CAUSAL_LM")
    save_adapter(tmp_path / "ad", Adapter(cfg, torch.ones(2, 4)))
    (tmp_path / "ad").rename(tmp_path / ".ad.old-123")  # the state right after the first rename
    assert torch.equal(load_adapter(tmp_path / "ad").prompt_embeddings, torch.ones(2, 4))


def test_output_that_is_the_current_folder_is_refused(tmp_path, model_dir, monkeypatch):
    for i in range(5):
        (tmp_path / f"user-{i}.txt").write_text(str(i))
    rows = write_jsonl(tmp_path / "sub" / "t.jsonl", rows_for("causal-lm", 4))
    monkeypatch.chdir(tmp_path)
    for output in (".", ".."):
        with pytest.raises(ConfigError, match="current folder"):
            train(TrainArgs(base_model=str(model_dir("gpt2")), task="causal-lm", train_file=str(rows),
                            output=output, max_steps=1, quiet=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"] + [f"user-{i}.txt" for i in range(5)]


def test_fresh_heads_with_any_name_are_trained_saved_and_exported(tmp_path):
    """DistilBERT's head is `pre_classifier` + `classifier`: both are missing from a bare checkpoint, so both
    train, go into the adapter, and come back at export (otherwise the export would carry a random layer)."""
    from transformers import AutoConfig, AutoModel

    from ptuning_onnx.export import export

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("distilbert", vocab_size=200, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                               max_position_embeddings=64)
    AutoModel.from_config(cfg).save_pretrained(tmp_path / "base")
    rows = [{"input_ids": [5 + i, 9, 12 + i % 3], "label": i % 2} for i in range(16)]
    args = TrainArgs(base_model=str(tmp_path / "base"), task="seq-cls", output=str(tmp_path / "ad"),
                     train_file=str(write_jsonl(tmp_path / "t.jsonl", rows)), num_virtual_tokens=3, epochs=1,
                     quiet=True)
    result = train(args)
    heads = {k.split(".")[0] for k in result.adapter.head_weights}
    assert heads == {"pre_classifier", "classifier"}
    saved = load_adapter(tmp_path / "ad")
    assert set(saved.config.modules_to_save) == {"pre_classifier", "classifier"}
    exported = export(tmp_path / "base", tmp_path / "ad", tmp_path / "onnx", progress=False)
    assert exported.report["passed"]
    # the exported reference uses the trained head: same logits as a reference built from the training result
    from ptuning_onnx.export import load_reference

    a, b = load_reference(tmp_path / "base", tmp_path / "ad"), load_reference(tmp_path / "base", tmp_path / "ad")
    ids = torch.tensor([[5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(a(ids, torch.ones_like(ids)).logits, b(ids, torch.ones_like(ids)).logits)


def test_unreadable_base_config_is_a_one_line_error(tmp_path, model_dir, capsys):
    from ptuning_onnx.cli import train as train_cli

    bad = tmp_path / "bad"
    shutil.copytree(model_dir("gpt2"), bad)
    (bad / "config.json").write_text("{not json")
    rows = write_jsonl(tmp_path / "t.jsonl", rows_for("causal-lm", 4))
    code = train_cli.main(["--base-model", str(bad), "--task", "causal-lm", "--train-file", str(rows),
                           "--output", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: cannot read base model") and "\n" not in err
