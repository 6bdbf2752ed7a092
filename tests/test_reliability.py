"""Reliability guarantees that no other test file proves (README, "Reliability guarantees"): pickles that would run
code are refused before they are read, truncated export files are refused, exit codes 1 and 130 of the real entry
points, and a torch-free top-level import."""

from __future__ import annotations

import importlib
import json
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import MODELS, ROOT
from ptuning_onnx.adapter import Adapter, save_adapter
from ptuning_onnx.config import PromptEncoderConfig
from ptuning_onnx.errors import AdapterError, ConfigError, ManifestError

SCRIPTS = Path(sys.executable).parent  # pip install -e . put the console scripts beside the interpreter


def _own_adapter(folder: Path, task_type: str) -> Path:
    torch.manual_seed(0)
    cfg = PromptEncoderConfig(num_virtual_tokens=3, token_dim=64, task_type=task_type)
    save_adapter(folder, Adapter(cfg, torch.randn(3, 64)))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A real export of the tiny BERT (feature-extraction); fast, as parity is skipped."""
    from ptuning_onnx.export import export

    root = tmp_path_factory.mktemp("reliability")
    adapter = _own_adapter(root / "adapter", "FEATURE_EXTRACTION")
    return export(MODELS / "bert", adapter, root / "onnx", progress=False, skip_verify=True).path


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---- no pickle is ever unpickled ---------------------------------------------------------------------------


class _Plant:
    """Unpickling this creates ``marker``: a stand-in for a pickle that runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickles_that_run_code_are_refused_unread(tmp_path, capsys):
    """Base-model and adapter folders that only have pickle weights are refused by export, training and the CLI,
    and the pickle never runs."""
    from ptuning_onnx.cli import export as export_cli
    from ptuning_onnx.export import export
    from ptuning_onnx.train import TrainArgs, train

    marker = tmp_path / "pickle-ran"
    payload = pickle.dumps(_Plant(marker))
    pickle.loads(payload).close()  # negative control: this payload really runs code when unpickled
    assert marker.exists()
    marker.unlink()

    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(MODELS / "gpt2" / "config.json", base / "config.json")
    (base / "pytorch_model.bin").write_bytes(payload)
    adapter = _own_adapter(tmp_path / "adapter", "CAUSAL_LM")
    with pytest.raises(ConfigError, match=r"only pickle \(.bin\) weights; refusing to unpickle"):
        export(base, adapter, tmp_path / "o", progress=False)
    rows = tmp_path / "t.jsonl"
    rows.write_text("".join(json.dumps({"input_ids": [5 + i, 9, 12]}) + "\n" for i in range(4)))
    with pytest.raises(ConfigError, match="refusing to unpickle"):
        train(TrainArgs(base_model=str(base), task="causal-lm", train_file=str(rows), output=str(tmp_path / "t"),
                        max_steps=1, quiet=True))
    code = export_cli.main(["--base-model", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "o"),
                            "--quiet"])
    assert code == 2 and "refusing to unpickle" in _one_line(capsys.readouterr().err)

    pickled_adapter = tmp_path / "pickled-adapter"
    pickled_adapter.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickled_adapter / "adapter_config.json")
    (pickled_adapter / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(AdapterError, match="pickle file.*refusing"):
        export(MODELS / "gpt2", pickled_adapter, tmp_path / "o", progress=False)
    assert not marker.exists()
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists()


# ---- truncated export files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,verify,error,words", [
    ("model.onnx", True, ManifestError, "model.onnx was modified after export"),
    ("model.onnx", False, None, "onnxruntime could not load model.onnx"),  # no sha256 check: onnxruntime's turn
    ("ptuning_onnx.json", True, ManifestError, "ptuning_onnx.json is not valid JSON"),
    ("ptuning_onnx.json", False, ManifestError, "ptuning_onnx.json is not valid JSON"),
])
def test_truncated_export_files_are_refused(exported, tmp_path, capsys, name, verify, error, words):
    from ptuning_onnx import runtime
    from ptuning_onnx.cli import run as run_cli

    folder = tmp_path / "onnx"
    shutil.copytree(exported, folder)
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(error or runtime.SessionLoadError, match=words):
        runtime.load(folder, provider="cpu", verify=verify)
    argv = [str(folder), "--input-ids", "2,5,3"] + ([] if verify else ["--no-verify"])
    assert run_cli.main(argv) == 2
    assert words in _one_line(capsys.readouterr().err)


# ---- exit codes of the real entry points ------------------------------------------------------------------


def test_run_exits_1_when_its_reader_goes_away(exported):
    """`ptuning-run ... | head -c0`: the reader is gone before the result is written; exit 1, no traceback."""
    proc = subprocess.Popen([str(SCRIPTS / "ptuning-run"), str(exported), "--input-ids", "2,5,3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()  # long before the model has loaded
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert b"Traceback" not in err and b"BrokenPipeError" not in err


def test_interrupted_export_exits_130_and_leaves_nothing(tmp_path):
    """Ctrl-C (SIGINT) as soon as the exporter's first graph exists: exit 130, one line, no output folder and no
    temporary folder left behind."""
    adapter = _own_adapter(tmp_path / "adapter", "SEQ_2_SEQ_LM")
    out = tmp_path / "out"
    proc = subprocess.Popen([str(SCRIPTS / "ptuning-export"), "--base-model", str(MODELS / "t5"), "--adapter",
                             str(adapter), "--output", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*/*.onnx")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, "the export finished (or failed) before it could be interrupted"
    assert _one_line(stderr) == "error: interrupted" and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ---- the top-level API ---------------------------------------------------------------------------------------


def test_top_level_import_is_torch_free():
    code = ("import sys, ptuning_onnx, ptuning_onnx.runtime\n"
            "from ptuning_onnx import load, PromptEncoderConfig\n"
            "assert load is ptuning_onnx.runtime.load\n"
            "assert set(ptuning_onnx.__all__) <= set(dir(ptuning_onnx))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_top_level_names_are_the_library_objects():
    import ptuning_onnx
    import ptuning_onnx.export  # binds the subpackage on the package: `ptuning_onnx.export` must stay export()
    from ptuning_onnx import PromptEncoder, PromptEncoderConfig, assert_parity, export, load, verify
    from ptuning_onnx import config, encoder, parity, runtime

    exporter = importlib.import_module("ptuning_onnx.export.exporter")
    assert export is exporter.export and ptuning_onnx.export is exporter.export
    assert PromptEncoderConfig is config.PromptEncoderConfig and PromptEncoder is encoder.PromptEncoder
    assert load is runtime.load and verify is parity.verify and assert_parity is parity.assert_parity
    assert ptuning_onnx.__all__ == ["PromptEncoderConfig", "PromptEncoder", "export", "load", "verify",
                                    "assert_parity"]
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        ptuning_onnx.nope  # noqa: B018 - the lookup itself is what is tested
