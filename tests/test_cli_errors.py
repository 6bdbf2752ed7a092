"""Every CLI failure is one ``error: ...`` line; an internal error also gets exit code 3 and a traceback log file.

Exit codes (``ptuning_onnx/cli/_common.py``): 0 ok, 1 failed parity, 2 bad input, 3 internal error, 130 interrupted.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import MODELS, ROOT
from ptuning_onnx.adapter import Adapter, save_adapter
from ptuning_onnx.cli import _common
from ptuning_onnx.config import PromptEncoderConfig

INTERNAL = re.compile(r"error: internal error: (?P<what>.+) \(traceback written to (?P<log>.+\.log)\)")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A real export of the tiny BERT (feature-extraction, our own adapter); fast, as parity is skipped."""
    from ptuning_onnx.export import export

    root = tmp_path_factory.mktemp("cli-errors")
    torch.manual_seed(0)
    cfg = PromptEncoderConfig(num_virtual_tokens=3, token_dim=64, task_type="FEATURE_EXTRACTION")
    save_adapter(root / "adapter", Adapter(cfg, torch.randn(3, 64)))
    return export(MODELS / "bert", root / "adapter", root / "onnx", progress=False, skip_verify=True).path


@pytest.fixture()
def log_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "logs"
    monkeypatch.setenv(_common.LOG_DIR_ENV, str(folder))
    return folder


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _internal(err: str) -> tuple:
    line = _one_line(err)
    match = INTERNAL.fullmatch(line)
    assert match, line
    return match["what"], Path(match["log"])


# (CLI module, library module whose function the CLI calls, that function, argv)
ENTRY_POINTS = {
    "run": ("ptuning_onnx.runtime", "load", lambda tmp: [str(tmp), "--text", "x"]),
    "export": ("ptuning_onnx.export", "export",
               lambda tmp: ["--base-model", str(MODELS / "bert"), "--adapter", str(tmp), "--output", str(tmp / "o")]),
    "verify": ("ptuning_onnx.runtime.golden", "verify_golden", lambda tmp: [str(tmp)]),  # the torch-free default
    "train": ("ptuning_onnx.train", "train",
              lambda tmp: ["--base-model", str(MODELS / "bert"), "--task", "seq-cls", "--train-file",
                           str(tmp / "t.jsonl"), "--output", str(tmp / "o"), "--quiet"]),
    "demo": ("ptuning_onnx.train", "train",
             lambda tmp: ["--base-model", str(MODELS / "bert"), "--output", str(tmp / "demo"), "--quiet"]),
}


@pytest.mark.parametrize("cli", sorted(ENTRY_POINTS))
def test_internal_error_is_one_line_exit_3_and_a_log(cli, tmp_path, log_dir, monkeypatch, capsys):
    """A library call that fails with something that is not a PtuningError (a bug): one line naming the type and
    the message, exit 3, and the full traceback in a new file under $PTUNING_ONNX_LOG_DIR."""
    module, function, argv = ENTRY_POINTS[cli]
    (tmp_path / "t.jsonl").write_text('{"text": "good", "label": "a"}\n{"text": "bad", "label": "b"}\n')
    monkeypatch.setattr(importlib.import_module(module), function,
                        _raise(RuntimeError("tensor  sizes differ\nat dim 1")))
    code = importlib.import_module(f"ptuning_onnx.cli.{cli}").main(argv(tmp_path))
    captured = capsys.readouterr()
    what, log = _internal(captured.err)
    assert code == _common.EXIT_INTERNAL == 3
    assert what == "RuntimeError: tensor sizes differ at dim 1"  # folded onto the one line
    assert log.parent == log_dir and log.name.startswith("ptuning-onnx-")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in fail" in text
    assert "RuntimeError: tensor  sizes differ\nat dim 1" in text  # the log keeps the message as it was
    assert f"ptuning_onnx.cli.{cli}" in text and str(tmp_path) in text  # which command, with which arguments


def test_each_internal_error_gets_its_own_log_in_the_temp_folder(tmp_path, monkeypatch, capsys):
    """Without $PTUNING_ONNX_LOG_DIR the log goes to the system temp folder, a new file every time."""
    from ptuning_onnx import runtime
    from ptuning_onnx.cli import run

    monkeypatch.delenv(_common.LOG_DIR_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what gettempdir() answers, kept under tmp_path
    monkeypatch.setattr(runtime, "load", _raise(KeyError("task")))
    logs = []
    for _ in range(2):
        assert run.main([str(tmp_path), "--text", "x"]) == 3
        what, log = _internal(capsys.readouterr().err)
        assert what == "KeyError: 'task'" and log.parent == tmp_path and log.is_file()
        logs.append(log)
    assert logs[0] != logs[1]
    assert (logs[0].stat().st_mode & 0o777) == 0o600  # tracebacks show paths and inputs: owner only


def test_internal_error_when_no_log_can_be_written(tmp_path, monkeypatch, capsys):
    """A log folder that cannot be made still gives one line and exit 3, saying why there is no log."""
    from ptuning_onnx import runtime
    from ptuning_onnx.cli import run

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(_common.LOG_DIR_ENV, str(blocker / "logs"))
    monkeypatch.setattr(runtime, "load", _raise(ZeroDivisionError()))
    assert run.main([str(tmp_path), "--text", "x"]) == 3
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: internal error: ZeroDivisionError (no traceback written: ")


def test_long_messages_are_cut_on_the_terminal_not_in_the_log(tmp_path, log_dir, monkeypatch, capsys):
    from ptuning_onnx import runtime
    from ptuning_onnx.cli import run

    monkeypatch.setattr(runtime, "load", _raise(ValueError("x" * 5000)))
    assert run.main([str(tmp_path), "--text", "x"]) == 3
    what, log = _internal(capsys.readouterr().err)
    assert what == "ValueError: " + "x" * _common.MAX_MESSAGE + "..."
    assert "x" * 5000 in log.read_text()


def test_keyboard_interrupt_is_130_and_user_errors_stay_2(tmp_path, log_dir, monkeypatch, capsys):
    from ptuning_onnx import runtime
    from ptuning_onnx.cli import run

    real_load = runtime.load
    monkeypatch.setattr(runtime, "load", _raise(KeyboardInterrupt()))
    assert run.main([str(tmp_path), "--text", "x"]) == 130
    assert _one_line(capsys.readouterr().err) == "error: interrupted"
    monkeypatch.setattr(runtime, "load", real_load)
    assert run.main([str(tmp_path / "missing"), "--text", "x"]) == 2  # a real bad input: no log for that
    assert _one_line(capsys.readouterr().err).startswith("error: exported model folder not found")
    assert not log_dir.exists()


def test_real_dependency_failure_through_the_installed_entry_point(exported, tmp_path):
    """`ptuning-run` (the console script pip installed) on a folder whose tokenizer.json is not JSON, with the
    sha256 check turned off: the tokenizers library raises its own plain ``Exception``, which this package does
    not recognise, so it is an internal error. With the check on, the same folder is refused as bad input (2)."""
    import shutil

    script = Path(sys.executable).with_name("ptuning-run")
    assert script.is_file(), "pip install -e . puts the console scripts beside the interpreter"
    folder = tmp_path / "onnx"
    shutil.copytree(exported, folder)
    (folder / "tokenizer.json").write_text("{broken")
    logs = tmp_path / "logs"
    env = {**os.environ, _common.LOG_DIR_ENV: str(logs)}

    def ptuning_run(*extra):
        return subprocess.run([str(script), str(folder), "--text", "hello", *extra], capture_output=True,
                              text=True, cwd=ROOT, env=env, timeout=120)

    proc = ptuning_run("--no-verify")
    assert proc.returncode == 3 and proc.stdout == ""
    what, log = _internal(proc.stderr)
    assert what.startswith("Exception: ") and log.parent == logs
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "Tokenizer.from_file" in text
    assert "'--no-verify'" in text

    checked = ptuning_run()  # negative control: the manifest's sha256 catches the same file as bad input
    assert checked.returncode == 2 and "tokenizer.json was modified after export" in _one_line(checked.stderr)
    assert sorted(p.name for p in logs.iterdir()) == [log.name]
