"""golden.npz: the parity cases and the PyTorch reference's outputs, saved by every export and checked again by the
torch-free runtime (runtime/golden.py, ``ptuning-verify``, ``runtime.load(verify="golden")``); negative controls: a
graph whose baked prompt was changed, and a golden file changed after export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import MODELS, ROOT
from ptuning_onnx import manifest as mf
from ptuning_onnx import runtime as rt
from ptuning_onnx.cli import verify as verify_cli
from ptuning_onnx.errors import ConfigError, ManifestError
from ptuning_onnx.tolerance import REL_LIMIT

GOLDEN_TASKS = ("causal-lm", "causal-lm-llama", "seq-cls", "token-cls", "feature-extraction", "seq2seq-lm")


@pytest.fixture(scope="module")
def variants(peft_adapters, tmp_path_factory):
    """{name: folder}: fp16 and int4 causal-lm exports, and an int4 seq-cls one (the quantized gate's golden, with
    the 16 extra classifier rows)."""
    from ptuning_onnx.export import export

    root = tmp_path_factory.mktemp("golden-variants")
    gpt2, bert = (MODELS / "gpt2", peft_adapters["causal-lm"]), (MODELS / "bert", peft_adapters["seq-cls"])
    return {
        "fp16": export(*gpt2, root / "fp16", dtype="fp16", progress=False).path,
        "int4": export(*gpt2, root / "int4", quantize="int4", progress=False).path,
        "int4-seq-cls": export(*bert, root / "int4-seq-cls", quantize="int4", progress=False).path,
    }


def _perturbed_copy(folder, out):
    """A copy of ``folder`` whose baked prompt (causal-lm: the prompt's keys/values; encoder tasks: the prompt table,
    a Constant of shape (1, n, token_dim)) has noise added, with the manifest's sha256 list made to match: only the
    numbers differ, so nothing but the golden check can notice."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(folder, out)
    manifest = mf.read_manifest(out)
    table = [1, manifest["num_virtual_tokens"], manifest["token_dim"]]
    rng = np.random.default_rng(7)
    changed = 0
    for graph in manifest["graphs"].values():
        model = onnx.load(str(out / graph["file"]))
        tensors = [t for t in model.graph.initializer if t.name.startswith(("prompt_key_", "prompt_value_"))]
        tensors += [a.t for node in model.graph.node if node.op_type == "Constant" for a in node.attribute
                    if a.name == "value" and list(a.t.dims) == table]
        for tensor in tensors:
            value = numpy_helper.to_array(tensor)
            noise = rng.standard_normal(value.shape) * max(float(np.abs(value).max()), 1.0)
            tensor.CopyFrom(numpy_helper.from_array((value + noise).astype(value.dtype), tensor.name))
            changed += 1
        onnx.save(model, str(out / graph["file"]))
    assert changed, f"no prompt tensor found in {folder}"
    manifest["files"] = mf.hash_files(out, manifest["files"])
    mf.write_manifest(out, manifest)
    return out


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


# ---------------------------------------------------------------- what the export writes

@pytest.mark.parametrize("task", GOLDEN_TASKS)
def test_golden_file_is_hashed_pickle_free_and_holds_the_parity_cases(exports, task):
    folder = exports[task]
    manifest = mf.read_manifest(folder)
    assert manifest["files"][mf.GOLDEN_NAME] == mf.sha256_file(folder / mf.GOLDEN_NAME)
    entry = manifest["golden"]
    assert entry["file"] == mf.GOLDEN_NAME and entry["gate"] == "exact"
    assert (entry["atol"], entry["rtol"]) == (manifest["parity"]["atol"], manifest["parity"]["rtol"])
    with np.load(folder / mf.GOLDEN_NAME, allow_pickle=False) as data:
        golden = {name: data[name] for name in data.files}
    assert all(a.dtype != object for a in golden.values())
    assert entry["cases"] == manifest["parity"]["cases"] == sum(n.endswith(".input_ids") and n.startswith("case")
                                                                for n in golden)
    shapes = {golden[f"case{i}.input_ids"].shape for i in range(entry["cases"])}
    assert {s[0] for s in shapes} == {1, 3} and {1, 7} <= {s[1] for s in shapes}  # parity's unseen shapes
    assert any((golden[f"case{i}.attention_mask"] == 0).any() for i in range(entry["cases"]))  # padded rows
    assert any(".control." in name for name in golden)  # the negative control's reference
    generates = task in ("causal-lm", "causal-lm-llama", "seq2seq-lm")
    assert ("greedy.tokens" in golden) == generates and entry["greedy_steps"] == (16 if generates else None)


def test_skip_verify_writes_no_golden_and_says_so(peft_adapters, tmp_path, capsys):
    from ptuning_onnx.export import export

    folder = export(MODELS / "bert", peft_adapters["feature-extraction"], tmp_path / "out", progress=False,
                    skip_verify=True).path
    manifest = mf.read_manifest(folder)
    assert manifest["golden"] is None and not (folder / mf.GOLDEN_NAME).exists()
    with pytest.raises(rt.NoGoldenError, match="skip-verify"):
        rt.verify_golden(folder, provider="cpu")
    with pytest.raises(rt.NoGoldenError):
        rt.load(folder, provider="cpu", verify="golden")
    assert verify_cli.main([str(folder)]) == 2
    assert "has no golden.npz" in _one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- good exports pass, by the export's own numbers

@pytest.mark.parametrize("task", GOLDEN_TASKS)
def test_golden_check_passes_and_equals_the_export_parity(exports, task):
    """The runtime's path on CPU computes what parity's sessions computed: the same max abs diffs."""
    report = rt.verify_golden(exports[task], provider="cpu")
    parity = mf.read_manifest(exports[task])["parity"]
    assert report["passed"] and report["provider"] == "CPUExecutionProvider"
    assert report["negative_control"]["failed_as_expected"]
    want = {k: v for k, v in parity["max_abs_diff"].items() if k != "present"}  # the cache: read by greedy steps
    assert report["max_abs_diff"] == pytest.approx(want, rel=1e-3, abs=1e-7)
    assert all(report["max_abs_diff"][k] <= report["tolerance"][k] == pytest.approx(1e-4) for k in want)
    if "greedy_logits" in want:
        assert report["token_agreement"] == 1.0


def test_fp16_and_quantized_exports_pass_by_their_own_rule(variants):
    fp16 = rt.verify_golden(variants["fp16"], provider="cpu")
    assert fp16["passed"] and (fp16["atol"], fp16["rtol"]) == (1e-2, 2e-2)
    assert fp16["tolerance"]["logits"] > 1e-2  # 1e-2 + 2% of the logits' scale
    parity = mf.read_manifest(variants["fp16"])["parity"]
    assert fp16["max_abs_diff"]["greedy_logits"] == pytest.approx(parity["max_abs_diff"]["greedy_logits"], rel=1e-3)
    for name, cases in (("int4", 1), ("int4-seq-cls", 2)):  # the padded 3-row case (+ 16 classifier rows)
        int4 = rt.verify_golden(variants[name], provider="cpu")
        parity = mf.read_manifest(variants[name])["parity"]
        assert int4["passed"] and int4["gate"] == "quantized" and int4["rel_limit"] == REL_LIMIT
        assert int4["relative_error"] == pytest.approx(parity["relative_error"], rel=1e-3)
        assert int4["cases"] == cases
        assert all(v > REL_LIMIT for v in int4["negative_control"]["relative_error"].values())


def test_load_verify_golden_and_its_report(exports):
    model = rt.load(exports["seq2seq-lm"], provider="cpu", verify="golden")
    assert model.golden_report["passed"] and model.golden_report["greedy_steps"] == 16
    assert rt.load(exports["seq-cls"], provider="cpu").golden_report is None
    with pytest.raises(ConfigError, match="'golden'"):
        rt.load(exports["seq-cls"], provider="cpu", verify="yes")


@pytest.mark.parametrize("task", ["causal-lm", "seq2seq-lm", "seq-cls"])
def test_golden_check_takes_the_cuda_code_path(exports, monkeypatch, task):
    """IOBinding, with the KV cache kept as OrtValues between steps, driven on CPU (as on CUDA, only the device
    differs): the golden check runs the runtime's path, so it sees that path's numbers."""
    from ptuning_onnx.runtime.session import GraphRunner

    calls = []
    original = GraphRunner._run_bound

    def spy(self, io, inputs, to_host):
        calls.append(self.session)
        return original(self, io, inputs, to_host)

    monkeypatch.setattr(GraphRunner, "force_binding", True)
    monkeypatch.setattr(GraphRunner, "_run_bound", spy)
    report = rt.verify_golden(exports[task], provider="cpu")
    assert report["passed"] and calls
    assert max(report["max_abs_diff"].values()) <= 1e-4


def test_cuda_sessions_keep_fp32_out_of_tf32(exports, monkeypatch):
    """onnxruntime's CUDA provider runs fp32 GEMMs in TF32 unless told not to, and then an fp32 folder fails its own
    golden check (H200, onnxruntime-gpu 1.31.1: 2.7e-4 and 1.3e-3 against 1e-4; 2.4e-7 and 4.8e-7 with
    use_tf32=0). The CUDA sessions are asked for with use_tf32=0; checked here by the options they are built with."""
    from ptuning_onnx.runtime import session

    asked = []
    original = session._create

    def create(paths, options, providers):
        asked.append(providers)
        if providers[0] != session.CPU:
            raise session.SessionLoadError("no CUDA here")  # provider="auto" then falls back to CPU
        return original(paths, options, providers)

    monkeypatch.setattr(session, "cuda_available", lambda: True)
    monkeypatch.setattr(session, "_preload_cuda_libraries", lambda: None)
    monkeypatch.setattr(session, "_create", create)
    assert rt.load(exports["seq-cls"], provider="auto").device == "cpu"
    assert asked[0][0] == (session.CUDA, {"device_id": 0, "use_tf32": "0"})


# ---------------------------------------------------------------- negative controls

@pytest.mark.parametrize("name", ["causal-lm", "seq-cls", "int4"])
def test_changed_prompt_fails_everywhere(exports, variants, tmp_path, capsys, name):
    folder = _perturbed_copy(variants[name] if name in variants else exports[name], tmp_path / "bad")
    with pytest.raises(rt.GoldenMismatchError, match="differ from golden.npz") as info:
        rt.verify_golden(folder, provider="cpu")
    assert info.value.report["passed"] is False
    with pytest.raises(rt.GoldenMismatchError):
        rt.load(folder, provider="cpu", verify="golden")
    rt.load(folder, provider="cpu")  # the hashes match: only the numbers tell
    assert verify_cli.main([str(folder), "--provider", "cpu", "--report", str(tmp_path / "r.json")]) == 1
    assert "golden check failed" in _one_error_line(capsys.readouterr().err)
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False


def test_tampered_golden_is_refused_by_its_hash(exports, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(exports["seq-cls"], folder)
    with np.load(folder / mf.GOLDEN_NAME, allow_pickle=False) as data:
        golden = {name: data[name] for name in data.files}
    golden["case0.reference.logits"] = golden["case0.reference.logits"] + 1.0  # a golden file that "agrees" less
    np.savez(folder / mf.GOLDEN_NAME, **golden)
    with pytest.raises(ManifestError, match="modified after export"):
        rt.verify_golden(folder, provider="cpu")
    model = rt.load(folder, provider="cpu", verify=False)  # loaded unchecked: the golden file is still hashed
    with pytest.raises(ManifestError, match="golden.npz was modified after export"):
        rt.verify_golden(model)
    assert verify_cli.main([str(folder)]) == 2
    assert "modified after export" in _one_error_line(capsys.readouterr().err)
    assert verify_cli.main([str(tmp_path / "missing")]) == 2
    assert "not found" in _one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- the CLI needs neither torch nor transformers

def test_verify_cli_runs_with_torch_and_transformers_unimportable(exports):
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'peft', 'optimum', 'onnx'):\n"
            "    sys.modules[name] = None  # importing it now raises ImportError\n"
            "from ptuning_onnx.cli.verify import main\n"
            f"code = main([{str(exports['causal-lm'])!r}, '--provider', 'cpu'])\n"
            "loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in\n"
            "                ('torch', 'transformers', 'peft', 'optimum', 'onnx'))\n"
            "print('EXIT', code, 'HEAVY', loaded)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary, last = proc.stdout.strip().splitlines()
    assert last == "EXIT 0 HEAVY []", proc.stdout
    summary = json.loads(summary)
    assert summary["passed"] and summary["check"] == "golden" and summary["provider"] == "CPUExecutionProvider"


def test_reference_rerun_is_still_offered(exports, capsys):
    assert verify_cli.main([str(exports["seq-cls"]), "--reference", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["check"] == "reference"
    assert verify_cli.main([str(exports["seq-cls"]), "--device", "cpu", "--provider", "cpu"]) == 2
    assert "--provider" in _one_error_line(capsys.readouterr().err)



def test_large_vocabularies_keep_a_column_subset_that_still_sees_the_prompt(peft_adapters, tmp_path, monkeypatch):
    """GPT-2-small's full logits made golden.npz 47 MB; above FULL_VOCAB_UP_TO columns only every position's top
    reference tokens and a seeded sample are kept. Forced here on the tiny vocabulary (1000)."""
    import importlib

    from ptuning_onnx.export import export

    golden_writer = importlib.import_module("ptuning_onnx.export.golden")
    monkeypatch.setattr(golden_writer, "FULL_VOCAB_UP_TO", 100)
    monkeypatch.setattr(golden_writer, "RANDOM_COLUMNS", 64)
    folder = export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "sub", progress=False).path
    with np.load(folder / mf.GOLDEN_NAME, allow_pickle=False) as data:
        columns = data["logits.columns"]
        assert 64 <= columns.size < 1000 and data["greedy.reference.logits"].shape[-1] == columns.size
    assert mf.read_manifest(folder)["golden"]["logits_columns"] == columns.size
    report = rt.verify_golden(folder, provider="cpu")
    assert report["passed"] and report["token_agreement"] == 1.0
    bad = _perturbed_copy(folder, tmp_path / "bad")
    with pytest.raises(rt.GoldenMismatchError):
        rt.verify_golden(bad, provider="cpu")


def test_fp16_bound_on_a_column_subset_is_the_exports_own(peft_adapters, tmp_path, monkeypatch):
    """fp16's bound grows with the largest reference logit; on a column subset that maximum could be smaller than
    the whole vocabulary's, so golden.npz keeps the export's scales and the host applies the same bound."""
    import importlib

    from ptuning_onnx.export import export

    golden_writer = importlib.import_module("ptuning_onnx.export.golden")
    monkeypatch.setattr(golden_writer, "FULL_VOCAB_UP_TO", 100)
    monkeypatch.setattr(golden_writer, "RANDOM_COLUMNS", 64)
    folder = export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "fp16", dtype="fp16",
                    progress=False).path
    manifest = mf.read_manifest(folder)
    assert set(manifest["golden"]["scales"]) == {"logits", "greedy_logits"}
    report = rt.verify_golden(folder, provider="cpu")
    for name in ("logits", "greedy_logits"):
        assert report["tolerance"][name] == pytest.approx(manifest["parity"]["tolerance"][name])
