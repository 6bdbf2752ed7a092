"""Shared fixtures: PEFT-made adapters on the tiny models in models/, and their exports, built under tmp dirs.

Adapters are made by PEFT itself (the oracle), with the encoder weights perturbed so that the prompt is far from
PEFT's initialisation and a wrong placement would show.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# task name -> (model folder, PEFT task type, transformers auto class)
TASKS = {
    "causal-lm": ("gpt2", "CAUSAL_LM", "AutoModelForCausalLM"),
    "causal-lm-llama": ("llama", "CAUSAL_LM", "AutoModelForCausalLM"),
    "seq-cls": ("bert", "SEQ_CLS", "AutoModelForSequenceClassification"),
    "token-cls": ("bert", "TOKEN_CLS", "AutoModelForTokenClassification"),
    "feature-extraction": ("bert", "FEATURE_EXTRACTION", "AutoModel"),
    "seq2seq-lm": ("t5", "SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM"),
}


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a module's tests: the tiny models (hidden 64) gain nothing from a second thread, a busy
    second core makes OpenMP spin (~10x slower), and training subprocesses run with OMP_NUM_THREADS=1, so in-process
    runs then sum floats the same way."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_peft_adapter(out_dir: Path, model_dir: Path, peft_task: str, auto_class: str, *, encoder="MLP",
                      num_virtual_tokens=5, seed=0, num_labels=None):
    """Write a P-tuning adapter with PEFT itself; returns (peft_model, out_dir)."""
    import torch
    import transformers
    from peft import PromptEncoderConfig, get_peft_model

    torch.manual_seed(seed)
    kwargs = {"num_labels": num_labels} if num_labels else {}
    base = getattr(transformers, auto_class).from_pretrained(model_dir, **kwargs)
    # Sizes read the way we read them: PEFT cannot find them in configs that say `dim`/`n_heads` (DistilBERT).
    from ptuning_onnx.config import PromptEncoderConfig as Ours

    sizes = Ours(num_virtual_tokens=num_virtual_tokens, task_type=peft_task).fill_from_model_config(base.config)
    cfg = PromptEncoderConfig(task_type=peft_task, num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=32,
                              encoder_reparameterization_type=encoder, token_dim=sizes.token_dim,
                              num_attention_heads=sizes.num_attention_heads, num_layers=sizes.num_layers)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        for name, p in model.named_parameters():
            if "modules_to_save" in name:  # a trained-looking head, so a head that fails to round-trip shows
                p.add_(torch.randn_like(p))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out_dir)
    return model, out_dir


def make_gpt2_adapters(root: Path, spec: dict) -> dict:
    """{name: adapter folder} for tiny GPT-2, written by PEFT; ``spec``: {name: (encoder, num_virtual_tokens, seed)}
    (different encoders and lengths exercise a multi-prompt export's padded tables)."""
    folders = {}
    for name, (encoder, n, seed) in spec.items():
        make_peft_adapter(root / name, MODELS / "gpt2", "CAUSAL_LM", "AutoModelForCausalLM", encoder=encoder,
                          num_virtual_tokens=n, seed=seed)
        folders[name] = root / name
    return folders


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory):
    """{task: adapter_dir}, one PEFT-written adapter per task (LSTM for seq-cls and token-cls, MLP elsewhere)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for task, (model, peft_task, auto) in TASKS.items():
        encoder = "LSTM" if task in ("seq-cls", "token-cls", "causal-lm-llama") else "MLP"
        make_peft_adapter(root / task, MODELS / model, peft_task, auto, encoder=encoder,
                          num_labels=3 if task in ("seq-cls", "token-cls") else None)
        out[task] = root / task
    return out


@pytest.fixture(scope="session")
def exports(peft_adapters, tmp_path_factory):
    """{task: exported_dir}, each made by ``export()`` with parity verified."""
    from ptuning_onnx.export import export

    root = tmp_path_factory.mktemp("exports")
    out = {}
    for task, (model, _, _) in TASKS.items():
        out[task] = export(MODELS / model, peft_adapters[task], root / task, progress=False).path
    return out


def rotated_golden_fails(folder, tmp_path, adapters: int) -> None:
    """golden.npz with every row's prompt id moved to the next adapter (rehashed) must fail verify_golden."""
    import shutil

    import numpy as np

    from ptuning_onnx import manifest as mf
    from ptuning_onnx.runtime.golden import GoldenMismatchError, verify_golden

    copy = tmp_path / "rotated"
    shutil.copytree(folder, copy)
    with np.load(copy / "golden.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    rotated = [k for k in arrays if k.endswith("prompt_ids")]
    assert rotated
    for name in rotated:
        arrays[name] = (arrays[name] + 1) % adapters
    np.savez(copy / "golden.npz", **arrays)
    manifest = mf.read_manifest(copy, verify=False)
    manifest["files"]["golden.npz"] = mf.sha256_file(copy / "golden.npz")
    mf.write_manifest(copy, manifest)
    with pytest.raises(GoldenMismatchError, match="differ from golden.npz"):
        verify_golden(copy)


def reference_vs_peft(peft_model, ref, vocab: int, *, seq2seq: bool, slice_peft: bool, token_types: bool = False):
    """(ours, PEFT's) outputs on the same random unpadded batch; PEFT's virtual positions sliced off when
    ``slice_peft`` (PEFT leaves them in for per-position outputs)."""
    import torch

    ids = torch.randint(5, vocab, (2, 7))
    mask = torch.ones_like(ids)
    extra = {"token_type_ids": torch.zeros_like(ids)} if token_types else {}
    with torch.no_grad():
        if seq2seq:
            dec = torch.randint(5, vocab, (2, 3))
            return (ref(ids, mask, decoder_input_ids=dec).logits,
                    peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)
        out = peft_model(input_ids=ids, attention_mask=mask, **extra)
        want = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        r = ref(ids, mask, *extra.values())
        got = r["logits"] if "logits" in r else r["last_hidden_state"]
    return got, (want[:, ref.n:] if slice_peft else want)


def swap_in_fused_graph(src: Path, dst: Path, ref, *, share_buffer: bool = True, opset: int = 18) -> Path:
    """A copy of the export folder ``src`` at ``dst`` holding the Llama builder's graph of ``ref`` (a reference or
    a multi-prompt list of them), whatever the export's timing kept, with a manifest as the builder's folders have
    it: cache holding the prompt, past/present buffer sharing as ``share_buffer`` says, no genai_config.json, the
    files' hashes renewed."""
    import json
    import shutil

    from ptuning_onnx import manifest as mf
    from ptuning_onnx.export import build_llama

    shutil.copytree(src, dst)
    build_llama.build(ref, dst / "model.onnx", opset=opset)
    (dst / "genai_config.json").unlink(missing_ok=True)
    manifest = json.loads((dst / mf.MANIFEST_NAME).read_text())
    manifest["model"].update(cache_holds_prompt=True, past_present_share_buffer=share_buffer)
    manifest["files"] = mf.hash_files(dst, [f for f in manifest["files"] if (dst / f).exists()])
    mf.write_manifest(dst, manifest)
    return dst
