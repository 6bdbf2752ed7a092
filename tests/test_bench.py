"""ptuning-bench: a --quick run on the tiny models of models/ (real contenders, worker processes, builds), checked
for what it reports, never for how fast anything was."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from ptuning_onnx.bench import report
from ptuning_onnx.bench.cli import main
from ptuning_onnx.bench.workloads import ALL_CONTENDERS, OURS

HAVE_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None
GEN_METRICS = {"total_ms", "ttft_ms", "per_token_ms"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # One thread: a smoke run on a machine that may be busy, where spinning OpenMP threads slow torch down most.
    code = main(["--quick", "--threads", "1", "--workloads", "llama,minilm", "--work", str(out / "work"), "--json",
                 str(out / "bench.json"), "--png", str(out / "bench.png")])
    assert code == 0
    return json.loads((out / "bench.json").read_text()), out


def test_quick_run_has_every_contenders_medians_and_ratios(quick):
    results, _ = quick
    llama, minilm = results["workloads"]["llama"], results["workloads"]["minilm"]
    running = [c for c in ALL_CONTENDERS if HAVE_GENAI or not c.startswith("genai")]
    for name in ALL_CONTENDERS:
        info = llama["contenders"][name]
        if name in running:
            assert info["status"] == "ok", info
            assert info["peak_rss_mb"] > 0 and info["load_ms"] > 0
        else:  # onnxruntime-genai is not installed here: reported, with how to get it
            assert info["status"] == "unavailable" and "pip install" in info["reason"]
    assert [(c["batch"], c["new_tokens"]) for c in llama["cells"]] == [(1, 4), (1, 8), (2, 4), (2, 8)]
    for cell in llama["cells"]:
        assert sorted(cell["medians"]) == sorted(running)
        assert all(set(m) == GEN_METRICS and all(v > 0 for v in m.values()) for m in cell["medians"].values())
        assert all(len(cell["samples"][c]) == 1 for c in running)  # --quick: one round after the warm-up
        for ours in OURS:
            assert sorted(cell["ratios"][ours]) == sorted(set(running) - {ours})
            for other, r in cell["ratios"][ours].items():
                want = cell["medians"][ours]["total_ms"] / cell["medians"][other]["total_ms"]
                assert set(r) == GEN_METRICS and r["total_ms"] == pytest.approx(want)
        # The same model gives the same greedy tokens: ours and PEFT share the adapter; genai's and optimum's
        # exports are both the bare base.
        assert cell["agreement"]["ours-fp32 vs peft"] == "same tokens"
        if HAVE_GENAI:
            assert cell["agreement"]["genai-fp32 vs optimum"] == "same tokens"
    classify = ["peft", "optimum", *OURS]
    for cell in minilm["cells"]:
        assert sorted(cell["medians"]) == sorted(classify)
        assert all(set(r) == {"ms"} for o in OURS for r in cell["ratios"][o].values())
        assert cell["agreement"]["ours-fp32 vs peft"] == "same labels"


def test_goals_table_json_and_png(quick):
    results, out = quick
    goals = results["goals"]
    assert {g["status"] for g in goals} <= {"pass", "miss", "not measured"}
    measured = {g["goal"] for g in goals if g["measured"] is not None}
    assert "generate, ours int4 / PEFT fp32" in measured and "classify fp32, ours / PEFT" in measured
    # Workloads that were not selected are reported as such, not as a pass.
    assert all(g["status"] == "not measured" for g in goals if g["where"].startswith(("gpt2", "export")))
    if HAVE_GENAI:
        assert "time to first token, ours / onnxruntime-genai, same precision" in measured
    text = report.markdown(results)
    assert "| goal | where | limit | measured | result |" in text and "ours-int4 / it" in text
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options_are_one_line_errors(capsys, tmp_path):
    assert main(["--workloads", "llama,nope", "--work", str(tmp_path)]) == 2
    assert main(["--repeats", "0", "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nope" in err[0] and "--repeats" in err[1]
    assert not any(tmp_path.iterdir())  # refused before anything was built


def test_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "ptuning_onnx.bench.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--workloads" in proc.stdout
