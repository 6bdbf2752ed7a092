"""``genai_config.json``: the sidecar that lets onnxruntime-genai (C, C#, Java, Python, mobile) run a causal-lm folder.

Our causal-lm graph already speaks genai's decoder interface (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.%d.key|value`` -> ``logits``, ``present.%d.key|value``); the prompt is inside the graph, so genai
generates with it and never sees it. Two settings are ours rather than the builder's defaults (shared/FACTS.md):
``position_ids`` is named among the inputs (genai feeds it only when named, and our graph needs it), and
``search.past_present_share_buffer`` is false, because the graph concatenates its past rather than writing into a
buffer of the final length. ``logits_to_keep`` is not named: genai does not feed it and its default (0, every
position) is what genai expects.

Written from the manifest's graph entry and the folder's JSON only (torch-free, like the manifest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

GENAI_CONFIG_NAME = "genai_config.json"
# genai's generic decoder-only model: the interface above, whatever the architecture inside the graph. Not the
# model's own type: genai's "gpt2" is an older interface with one combined past per layer ("Model input was not
# found" on our graph, measured with 0.13.2), and other types add per-family behaviour we do not need.
GENAI_MODEL_TYPE = "decoder"


def genai_config(manifest: dict, model_config: dict, generation_config: Optional[dict] = None) -> dict:
    """onnxruntime-genai's config for a causal-lm ``manifest`` (its ``graphs.model`` entry gives names and shapes).

    ``model_config``: the folder's config.json; ``generation_config``: its generation_config.json, whose eos and
    sampling settings win over config.json's, as in transformers and our runtime.
    """
    if manifest["task"] != "causal-lm":
        raise ValueError(f"genai_config.json describes causal-lm folders, not {manifest['task']}")
    graph = manifest["graphs"]["model"]
    names = {i["name"] for i in graph["inputs"]}
    past = [i for i in graph["inputs"] if i["name"].startswith("past_key_values.")]
    if not past:
        raise ValueError("the causal-lm graph has no past_key_values inputs")
    _, kv_heads, _, head_size = past[0]["shape"]  # (batch, kv_heads, past, head_dim): heads and head_dim are numbers
    gen = generation_config or {}
    cfg = manifest["model"]
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    first_eos = eos[0] if isinstance(eos, list) and eos else eos
    pad = next((v for v in (gen.get("pad_token_id"), cfg.get("pad_token_id"), first_eos, 0) if v is not None))
    bos = next((v for v in (gen.get("bos_token_id"), cfg.get("bos_token_id"), first_eos, 0) if v is not None))
    heads = next((model_config[k] for k in ("num_attention_heads", "n_head", "num_heads") if k in model_config),
                 kv_heads)
    hidden = next((model_config[k] for k in ("hidden_size", "n_embd", "d_model") if k in model_config),
                  heads * head_size)
    # Every length genai counts is the user's: the virtual tokens are added inside the graph.
    context = cfg.get("max_user_tokens") or 4096
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if "position_ids" in names:  # absent for ALiBi models (Bloom, Falcon-alibi)
        inputs["position_ids"] = "position_ids"
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": graph["file"],
                "head_size": head_size,
                "hidden_size": hidden,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": len(past) // 2,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": GENAI_MODEL_TYPE,
            "vocab_size": cfg["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(gen.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,  # our graph concatenates its past (see the module docstring)
            "repetition_penalty": float(gen.get("repetition_penalty") or 1.0),
            "temperature": float(gen.get("temperature") or 1.0),
            "top_k": int(gen.get("top_k") or 50),
            "top_p": float(gen.get("top_p") or 1.0),
        },
    }


def write_genai_config(folder: Path, manifest: dict) -> Path:
    """Write ``genai_config.json`` into an export ``folder`` (before its files are hashed)."""
    folder = Path(folder)
    model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    generation = folder / "generation_config.json"
    gen = json.loads(generation.read_text(encoding="utf-8")) if generation.is_file() else None
    path = folder / GENAI_CONFIG_NAME
    path.write_text(json.dumps(genai_config(manifest, model_config, gen), indent=2, sort_keys=True) + "\n",
                    encoding="utf-8")
    return path
