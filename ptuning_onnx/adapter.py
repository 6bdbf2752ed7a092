"""Adapter folders in PEFT's P-tuning format, plus the training state PEFT throws away.

Layout::

    adapter_config.json          PEFT's config (inference_mode=true, peft_type=P_TUNING)
    adapter_model.safetensors    prompt_embeddings [total_virtual_tokens, token_dim] (encoder OUTPUT, eval mode)
                                 + base_model.<module>.<param> for modules_to_save (e.g. a classifier)
    labels.json                  (ours, optional) label names for classification tasks
    template.json                (ours, optional) the P-tuning template, {"template": "<p:4> {text} ..."}; its
                                 virtual tokens are the table's rows, numbered across the slots (template.py)
    training_state/              (ours, optional) what resuming needs:
        encoder.safetensors      the full prompt-encoder weights (embedding, mlp_head, lstm_head)
        optimizer.safetensors    optimizer tensors, flattened; scalars live in state.json
        state.json               step, epoch, RNG states are tensors in rng.safetensors
        rng.safetensors

Only JSON and safetensors are read. A pickle (``adapter_model.bin``) is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ._fs import atomic_write_dir, recover_interrupted
from .config import PromptEncoderConfig
from .errors import AdapterError, ConfigError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LABELS_NAME = "labels.json"
TEMPLATE_NAME = "template.json"
STATE_DIR = "training_state"
PROMPT_KEY = "prompt_embeddings"
BASE_PREFIX = "base_model."
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt")
STATE_FILES = ("encoder.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


@dataclass
class Adapter:
    """An adapter in memory. ``head_weights`` maps base-model parameter names (``classifier.weight``) to tensors."""

    config: PromptEncoderConfig
    prompt_embeddings: torch.Tensor  # (total_virtual_tokens, token_dim)
    head_weights: dict = field(default_factory=dict)
    labels: Optional[list] = None
    template: Optional[str] = None  # template source; None = PEFT's prefix

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def prompt(self) -> torch.Tensor:
        """The rows that are prepended to the input: the first ``num_virtual_tokens`` (PEFT ignores the rest)."""
        return self.prompt_embeddings[: self.config.num_virtual_tokens]


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise AdapterError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{what} {path} is not valid JSON: {exc}") from None


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read a P-tuning adapter written by PEFT or by us."""
    folder = Path(path)
    recover_interrupted(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [name for name in PICKLE_NAMES if (folder / name).exists()]
        if pickles:
            raise AdapterError(
                f"{folder / pickles[0]} is a pickle file, which can run arbitrary code when loaded; refusing it. "
                f"Re-save the adapter with safetensors (PEFT: save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterError(f"{weights} not found; is {folder} a P-tuning adapter folder?")
    try:
        config = PromptEncoderConfig.from_dict(read_json(folder / CONFIG_NAME, "adapter config"))
    except (ConfigError, TypeError) as exc:
        raise AdapterError(f"{folder / CONFIG_NAME}: {exc}") from None
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise AdapterError(f"{weights} is not a readable safetensors file: {exc}") from None
    if PROMPT_KEY not in tensors:
        raise AdapterError(f"{weights} has no '{PROMPT_KEY}' tensor; found: {sorted(tensors)}")
    table = tensors.pop(PROMPT_KEY)
    if table.ndim != 2:
        raise AdapterError(f"'{PROMPT_KEY}' must be 2-D [virtual_tokens, token_dim], got shape {list(table.shape)}")
    if config.token_dim is not None and table.shape[1] != config.token_dim:
        raise AdapterError(f"'{PROMPT_KEY}' has width {table.shape[1]} but adapter token_dim is {config.token_dim}")
    if table.shape[0] < config.num_virtual_tokens:
        raise AdapterError(
            f"'{PROMPT_KEY}' has {table.shape[0]} rows, fewer than num_virtual_tokens={config.num_virtual_tokens}"
        )
    head = {}
    for key, value in tensors.items():
        name = key[len(BASE_PREFIX):] if key.startswith(BASE_PREFIX) else key
        # PEFT >= 0.7 may store wrapped names; strip the wrapper so names match the plain base model.
        head[name.replace(".modules_to_save.default", "")] = value
    labels = None
    if (folder / LABELS_NAME).is_file():
        data = read_json(folder / LABELS_NAME, "labels file")
        labels = data.get("labels") if isinstance(data, dict) else None
        if not isinstance(labels, list) or not labels or not all(isinstance(x, (str, int)) for x in labels):
            raise AdapterError(f"{folder / LABELS_NAME} must be {{\"labels\": [names...]}}, got {str(data)[:80]}")
    template = None
    if (folder / TEMPLATE_NAME).is_file():
        data = read_json(folder / TEMPLATE_NAME, "template file")
        template = data.get("template") if isinstance(data, dict) else None
        if not isinstance(template, str):
            raise AdapterError(f"{folder / TEMPLATE_NAME} must be {{\"template\": \"...\"}}, got {str(data)[:80]}")
        from .template import TemplateError, parse

        try:
            total = parse(template).num_virtual_tokens
        except TemplateError as exc:
            raise AdapterError(f"{folder / TEMPLATE_NAME}: {exc}") from None
        if total != config.num_virtual_tokens:
            raise AdapterError(f"{folder / TEMPLATE_NAME}: the template has {total} virtual tokens but the adapter "
                               f"config says num_virtual_tokens={config.num_virtual_tokens}")
    return Adapter(config=config, prompt_embeddings=table.float(), head_weights=head, labels=labels,
                   template=template)


def save_adapter(path: str | os.PathLike, adapter: Adapter) -> Path:
    """Write ``adapter`` in PEFT's format, atomically (a temporary folder beside the target, then a rename).

    Our own files (``labels.json``, ``training_state/``) already in the folder are kept unless replaced.
    """
    folder = Path(path)
    config = PromptEncoderConfig.from_dict(adapter.config.to_dict())
    config.inference_mode = True  # PEFT writes the baked table, so the saved config is always inference-mode
    tensors = {PROMPT_KEY: adapter.prompt_embeddings.detach().float().contiguous().cpu()}
    for name, value in adapter.head_weights.items():
        tensors[BASE_PREFIX + name] = value.detach().contiguous().cpu()

    def write(tmp: Path) -> None:
        with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as fh:
            json.dump(config.to_dict(), fh, indent=2, sort_keys=True)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if adapter.labels is not None:
            with open(tmp / LABELS_NAME, "w", encoding="utf-8") as fh:
                json.dump({"labels": list(adapter.labels)}, fh, indent=2)
        if adapter.template is not None:
            with open(tmp / TEMPLATE_NAME, "w", encoding="utf-8") as fh:
                json.dump({"template": adapter.template}, fh, indent=2)

    atomic_write_dir(folder, write, owned=OWNED, keep=[STATE_DIR])
    return folder


OWNED = (CONFIG_NAME, WEIGHTS_NAME, LABELS_NAME, TEMPLATE_NAME, STATE_DIR)


# ---- training state (resume) ------------------------------------------------------------------------------


def save_training_state(folder: Path, *, encoder_state: dict, optimizer_state: dict, scaler_state: Optional[dict],
                        meta: dict, rng: dict) -> None:
    """Write ``training_state/`` atomically. Optimizer state is flattened to tensors plus JSON scalars."""
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    state_meta = dict(meta, optimizer=opt_meta, scaler=scaler_state)

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in encoder_state.items()}, str(tmp / "encoder.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({k: v.contiguous().cpu() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        with open(tmp / "state.json", "w", encoding="utf-8") as fh:
            json.dump(state_meta, fh, indent=2, sort_keys=True)

    atomic_write_dir(Path(folder) / STATE_DIR, write, owned=STATE_FILES)


def load_training_state(folder: Path) -> Optional[dict]:
    state_dir = Path(folder) / STATE_DIR
    recover_interrupted(Path(folder))
    recover_interrupted(state_dir)
    if not (state_dir / "state.json").is_file():
        return None
    meta = read_json(state_dir / "state.json", "training state")
    try:
        encoder = load_file(str(state_dir / "encoder.safetensors"))
        opt_tensors = load_file(str(state_dir / "optimizer.safetensors"))
        rng = load_file(str(state_dir / "rng.safetensors"))
    except Exception as exc:
        raise AdapterError(f"training state in {state_dir} is unreadable: {exc}") from None
    optimizer = _unflatten_optimizer(opt_tensors, meta.pop("optimizer"))
    return {"encoder": encoder, "optimizer": optimizer, "rng": rng, "meta": meta}


def _flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for pid, pstate in state_dict["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = flat.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
