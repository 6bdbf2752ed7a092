"""The PyTorch reference: a frozen transformers model plus a prompt source.

This module is the single source of truth for where the prompt goes. Training, export and parity all call it.

Placement (PEFT's, see FACTS.md): the prompt is prepended to the input embeddings; the mask is prefixed with ones
and ``token_type_ids`` with zeros. Unlike PEFT, the outputs hold only the user's positions, and positions are
explicit: the prompt sits at 0..n-1 and each row's first real token at n whatever its left padding, so a padded
row gives what it gives alone (batch invariance). On unpadded rows this equals PEFT.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput

from .adapter import Adapter
from .config import PromptEncoderConfig, TaskType
from .encoder import PromptEncoder
from .errors import AdapterError, ConfigError

_AUTO_CLASSES = {
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
    TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    TaskType.FEATURE_EXTRACTION: "AutoModel",
}
# Heads that a classification task trains from scratch; PEFT's default modules_to_save for these tasks.
HEAD_MODULES = ("classifier", "score")


def load_base(path: Union[str, os.PathLike], task: TaskType, *, labels: Optional[list] = None,
              dtype: torch.dtype = torch.float32, pad_token_id: Optional[int] = None) -> nn.Module:
    """Load a base model folder for ``task`` from safetensors only (``.bin`` pickles are refused).

    ``pad_token_id`` fills a config without one: decoder classifiers refuse batches > 1 otherwise.
    """
    import transformers

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"base model folder {folder} has no config.json")
    if not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")):
            raise ConfigError(f"base model {folder} has only pickle (.bin) weights; refusing to unpickle them. "
                              "Convert them to safetensors first")
        raise ConfigError(f"base model folder {folder} has no .safetensors weights")
    kwargs = {}
    if labels is not None and task in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS):
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(map(str, labels))),
                      label2id={str(name): i for i, name in enumerate(labels)})
    auto = getattr(transformers, _AUTO_CLASSES[task])
    verbosity = transformers.logging.get_verbosity()
    # A fresh classification head is expected (the adapter brings its weights); transformers' warning about it
    # would only confuse.
    transformers.logging.set_verbosity_error()
    try:
        model, info = auto.from_pretrained(str(folder), use_safetensors=True, dtype=dtype, output_loading_info=True,
                                           **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise ConfigError(f"architecture '{_model_type(folder)}' does not support task {task.value}") from None
        raise ConfigError(f"cannot load base model {folder}: {exc}") from None
    except OSError as exc:  # transformers' wording for unreadable config or weight files
        raise ConfigError(f"cannot load base model {folder}: {' '.join(str(exc).split())}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    # Modules the checkpoint did not have are the task head(s) the prompt trains with (classifier, score,
    # pre_classifier, classification_head, ...): found from the checkpoint itself, not from a list of names.
    model._ptuning_new_modules = _new_modules(model, info.get("missing_keys", []))
    if model.config.pad_token_id is None and task == TaskType.SEQ_CLS:
        model.config.pad_token_id = pad_token_id if pad_token_id is not None else 0
    return model.eval()


def _model_type(folder: Path) -> str:
    import json

    with open(folder / "config.json", encoding="utf-8") as fh:
        return json.load(fh).get("model_type", "?")


class PTuningModel(nn.Module):
    """Frozen ``base`` plus a prompt source: a live :class:`PromptEncoder` (training) or a baked table.

    ``forward`` returns a ``ModelOutput`` whose per-position outputs (``logits`` for CAUSAL_LM/TOKEN_CLS,
    ``last_hidden_state`` for FEATURE_EXTRACTION, ``encoder_last_hidden_state`` for SEQ_2_SEQ_LM) cover only
    the user's positions. Classification heads trained with the prompt belong to ``base`` and are not frozen.
    """

    def __init__(self, base: nn.Module, prompt: Union[PromptEncoder, torch.Tensor], task: TaskType,
                 num_virtual_tokens: Optional[int] = None):
        super().__init__()
        self.base = base
        self.task = TaskType(task)
        if isinstance(prompt, PromptEncoder):
            self.encoder: Optional[PromptEncoder] = prompt
            self.num_virtual_tokens = num_virtual_tokens or prompt.num_virtual_tokens
            self.register_buffer("table", None)
        else:
            self.encoder = None
            self.num_virtual_tokens = num_virtual_tokens or prompt.shape[0]
            self.register_buffer("table", prompt.detach().clone()[: self.num_virtual_tokens], persistent=False)
        token_dim = self.base.get_input_embeddings().weight.shape[1]
        width = (self.table if self.encoder is None else self.encoder.embedding.weight).shape[1]
        if width != token_dim:
            raise ConfigError(f"prompt token_dim is {width} but the base model's embedding width is {token_dim}")
        self._takes_positions = "position_ids" in inspect.signature(self._core_forward()).parameters
        self.position_offset = self._find_position_offset() if self._takes_positions else 0

    @classmethod
    def from_adapter(cls, base: nn.Module, adapter: Adapter, task: Optional[TaskType] = None) -> "PTuningModel":
        """Baked reference from an adapter: applies its head weights to ``base``, then uses its prompt table."""
        apply_head_weights(base, adapter.head_weights)
        task = TaskType(task or adapter.config.task_type or TaskType.CAUSAL_LM)
        return cls(base, adapter.prompt().to(base.dtype), task)

    def _core_forward(self):
        if self.task == TaskType.SEQ_2_SEQ_LM:
            return self.base.get_encoder().forward
        return self.base.forward

    @torch.no_grad()
    def _find_position_offset(self) -> int:
        """What ``position_ids`` must start at to equal the model's own default positions (PEFT passes none).

        0 for most models (OPT adds its offset of 2 itself); RoBERTa-style models index their position table from
        ``pad_token_id + 1``. Probed on a 3-token input, so no per-architecture list is needed. A model whose
        default matches no offset gets no explicit positions (then only unpadded rows are exact).
        """
        core = self._core_forward()
        embeds = self.base.get_input_embeddings().weight[:3].detach().unsqueeze(0).to(self.base.dtype)
        mask = torch.ones(1, 3, dtype=torch.long)
        modes = [(m, m.training) for m in self.base.modules()]
        self.base.eval()
        try:
            want = core(inputs_embeds=embeds, attention_mask=mask)[0]
            pad = getattr(self.base.config, "pad_token_id", None)
            for offset in dict.fromkeys([0] + ([pad + 1] if isinstance(pad, int) else [])):
                positions = torch.arange(3).unsqueeze(0) + offset
                got = core(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)[0]
                if torch.allclose(got, want, atol=1e-6, rtol=0):
                    return offset
        except Exception:  # a model that cannot run this probe keeps PEFT's behaviour
            pass
        finally:
            for module, mode in modes:
                module.training = mode
        self._takes_positions = False
        return 0

    @property
    def n(self) -> int:
        return self.num_virtual_tokens

    @property
    def padding_side(self) -> str:
        """Left for causal LMs and for classifiers that pool the LAST position (decoder ``score`` heads): the
        prompt is prepended, so the last position must be a real token. Right for the rest (T5's relative
        positions cannot be told to skip left padding)."""
        if self.task == TaskType.CAUSAL_LM or (self.task == TaskType.SEQ_CLS and "score" in head_modules(self.base)):
            return "left"
        return "right"

    def train(self, mode: bool = True) -> "PTuningModel":
        """Only the prompt encoder (and a task head) train; the frozen base keeps dropout off."""
        super().train(mode)
        self.base.eval()
        if mode and self.task in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS):
            for name in head_modules(self.base):
                self.base.get_submodule(name).train()
        return self

    def prompt_embeds(self, batch: int) -> torch.Tensor:
        """(batch, n, token_dim) virtual-token embeddings, in the base model's dtype."""
        if self.encoder is not None:
            idx = torch.arange(self.encoder.total_virtual_tokens, device=self.encoder.embedding.weight.device)
            table = self.encoder(idx.unsqueeze(0))[0, : self.n]
        else:
            table = self.table
        return table.to(self.base.dtype).unsqueeze(0).expand(batch, -1, -1)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) embeddings of the user's ids; a template's model (reference_template.py) maps placeholders."""
        return self.base.get_input_embeddings()(input_ids)

    def user_positions(self, attention_mask: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        """Positions of the last ``seq`` user slots: n + (index among the row's real tokens). Pads get n."""
        seq = attention_mask.shape[1] - past_length
        pos = attention_mask.long().cumsum(-1) - 1
        return (pos.clamp(min=0) + self.n + self.position_offset)[:, past_length:past_length + seq]

    def extend_inputs(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      token_type_ids: Optional[torch.Tensor] = None) -> dict:
        """Base-model kwargs for a prefill: prompt embeddings joined in front of the user's, with mask/positions."""
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_tokens(input_ids)
        ones = torch.ones(batch, self.n, dtype=attention_mask.dtype, device=attention_mask.device)
        kwargs = {
            "inputs_embeds": torch.cat([self.prompt_embeds(batch), embeds], dim=1),
            "attention_mask": torch.cat([ones, attention_mask], dim=1),
        }
        if self._takes_positions:
            prompt_pos = torch.arange(self.n, device=input_ids.device).unsqueeze(0).expand(batch, -1)
            prompt_pos = prompt_pos + self.position_offset
            kwargs["position_ids"] = torch.cat([prompt_pos, self.user_positions(attention_mask)], dim=1)
        if token_type_ids is not None:
            zeros = torch.zeros(batch, self.n, dtype=token_type_ids.dtype, device=token_type_ids.device)
            kwargs["token_type_ids"] = torch.cat([zeros, token_type_ids], dim=1)
        return kwargs

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                decoder_input_ids: Optional[torch.Tensor] = None,
                decoder_attention_mask: Optional[torch.Tensor] = None) -> ModelOutput:
        kwargs = self.extend_inputs(input_ids, attention_mask, token_type_ids)
        return self.task_forward(kwargs, self.n, labels, decoder_input_ids, decoder_attention_mask)

    def task_forward(self, kwargs: dict, n: int, labels: Optional[torch.Tensor] = None,
                     decoder_input_ids: Optional[torch.Tensor] = None,
                     decoder_attention_mask: Optional[torch.Tensor] = None) -> ModelOutput:
        """The base on prefill ``kwargs`` whose first ``n`` positions are virtual (``extend_inputs``'s, or a
        multi-prompt graph's padded ones), with the task's head and outputs cut to the user's positions."""
        if self.task == TaskType.CAUSAL_LM:
            if labels is not None:
                pad = torch.full((labels.shape[0], n), -100, dtype=labels.dtype, device=labels.device)
                kwargs["labels"] = torch.cat([pad, labels], dim=1)
            out = self.base(**kwargs, use_cache=False)
            out["logits"] = out["logits"][:, n:]
            return out
        if self.task == TaskType.SEQ_2_SEQ_LM:
            out = self.base(**kwargs, labels=labels, decoder_input_ids=decoder_input_ids,
                            decoder_attention_mask=decoder_attention_mask, use_cache=False)
            out["encoder_last_hidden_state"] = out["encoder_last_hidden_state"][:, n:]
            return out
        if self.task == TaskType.TOKEN_CLS:
            out = self.base(**kwargs)
            out["logits"] = out["logits"][:, n:]
            if labels is not None:
                out["loss"] = nn.functional.cross_entropy(out["logits"].flatten(0, 1).float(), labels.flatten(),
                                                          ignore_index=-100)
            return out
        if self.task == TaskType.SEQ_CLS:
            if self._pools_last_token():
                return self._classify_last_token(kwargs, labels)
            return self.base(**kwargs, labels=labels)
        out = self.base(**kwargs)  # FEATURE_EXTRACTION
        out["last_hidden_state"] = out["last_hidden_state"][:, n:]
        return out

    def _pools_last_token(self) -> bool:
        return "score" in head_modules(self.base) and hasattr(self.base, self.base.base_model_prefix)

    def _classify_last_token(self, kwargs: dict, labels: Optional[torch.Tensor]) -> ModelOutput:
        """Decoder classifiers (``score`` heads) pool one position. Given ``inputs_embeds``, transformers pools the
        LAST position, which is a pad on a right-padded row. Pool each row's last REAL token instead, so either
        padding side gives what the row gives alone; on unpadded rows this is exactly what PEFT computes."""
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        body = getattr(self.base, self.base.base_model_prefix)
        hidden = body(**kwargs, use_cache=False)[0]  # (B, n+L, D)
        mask = kwargs["attention_mask"]
        index = ((torch.cumsum(torch.ones_like(mask), -1) - 1) * mask).argmax(-1)  # last real position per row
        hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, D)
        logits = self.base.score(hidden)  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.base.config.problem_type == "multi_label_classification":
                loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())
            elif self.base.config.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)

    # ---- decoding, used by parity checks and tests ---------------------------------------------------------

    @torch.no_grad()
    def greedy(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               max_new_tokens: int = 16, return_logits: bool = False):
        """Greedy new tokens (batch, max_new_tokens) through the KV cache; no EOS stop, so shapes are fixed.

        With ``return_logits`` also the (batch, max_new_tokens, vocab) logits each token was chosen from.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.task == TaskType.SEQ_2_SEQ_LM:
            tokens, logits = self._greedy_seq2seq(input_ids, attention_mask, max_new_tokens)
            return (tokens, logits) if return_logits else tokens
        if self.task != TaskType.CAUSAL_LM:
            raise ConfigError(f"greedy decoding needs CAUSAL_LM or SEQ_2_SEQ_LM, not {self.task.value}")
        kwargs = self.extend_inputs(input_ids, attention_mask)
        out = self.base(**kwargs, use_cache=True)
        mask = attention_mask
        new, logits = [], []
        for step in range(max_new_tokens):
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            new.append(token)
            if step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            full_mask = torch.cat([torch.ones(mask.shape[0], self.n, dtype=mask.dtype), mask], dim=1)
            step_kwargs = {"attention_mask": full_mask, "past_key_values": out.past_key_values, "use_cache": True}
            if self._takes_positions:
                step_kwargs["position_ids"] = self.user_positions(mask)[:, -1:]
            out = self.base(input_ids=token, **step_kwargs)
        tokens = torch.cat(new, dim=1)
        return (tokens, torch.stack(logits, 1)) if return_logits else tokens

    def _greedy_seq2seq(self, input_ids, attention_mask, max_new_tokens):
        kwargs = self.extend_inputs(input_ids, attention_mask)
        encoder_out = self.base.get_encoder()(inputs_embeds=kwargs["inputs_embeds"],
                                              attention_mask=kwargs["attention_mask"])
        start = self.base.config.decoder_start_token_id
        tokens = torch.full((input_ids.shape[0], 1), start, dtype=torch.long)
        past, new, logits = None, [], []
        for _ in range(max_new_tokens):
            out = self.base(encoder_outputs=encoder_out, attention_mask=kwargs["attention_mask"],
                            decoder_input_ids=tokens[:, -1:] if past is not None else tokens,
                            past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            new.append(token)
            tokens = torch.cat([tokens, token], dim=1)
        return torch.cat(new, dim=1), torch.stack(logits, 1)


def _new_modules(model: nn.Module, missing_keys) -> list[str]:
    """The shortest module paths all of whose parameters were missing from the checkpoint."""
    params = [name for name, _ in model.named_parameters()]
    missing = set(missing_keys) & set(params)
    found: list[str] = []
    for key in sorted(missing):
        parts = key.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if all(name in missing for name in params if name.startswith(prefix + ".")):
                if prefix not in found:
                    found.append(prefix)
                break
    return found


def head_modules(base: nn.Module) -> list[str]:
    """Names of the base's freshly-initialised task heads that train with the prompt.

    From the checkpoint's missing keys when ``load_base`` loaded it; otherwise PEFT's default names."""
    found = getattr(base, "_ptuning_new_modules", None)
    if found is not None:
        return list(found)
    names = dict(base.named_modules())
    return [name for name in HEAD_MODULES if name in names]


def head_state(base: nn.Module) -> dict:
    """``{param_name: tensor}`` for the task head(s), as they go into ``adapter_model.safetensors``."""
    out = {}
    for module in head_modules(base):
        for name, value in base.get_submodule(module).state_dict().items():
            out[f"{module}.{name}"] = value.detach().clone()
    return out


def apply_head_weights(base: nn.Module, weights: dict) -> None:
    """Load ``modules_to_save`` weights into ``base``; shape or name mismatches are errors, not warnings."""
    if not weights:
        return
    params = base.state_dict()
    for name, value in weights.items():
        if name not in params:
            raise AdapterError(f"adapter weight '{name}' has no matching parameter in the base model")
        if tuple(params[name].shape) != tuple(value.shape):
            raise AdapterError(f"adapter weight '{name}' has shape {list(value.shape)} but the base model expects "
                               f"{list(params[name].shape)} (different number of labels?)")
    base.load_state_dict(weights, strict=False)


def freeze_base(model: PTuningModel) -> list[nn.Parameter]:
    """Freeze the base except its task head; return the trainable parameters (encoder first)."""
    trainable = list(model.encoder.parameters()) if model.encoder is not None else []
    for p in model.base.parameters():
        p.requires_grad_(False)
    if model.task in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS):
        for module in head_modules(model.base):
            for p in model.base.get_submodule(module).parameters():
                p.requires_grad_(True)
                trainable.append(p)
    return trainable


def new_encoder(config: PromptEncoderConfig, base: nn.Module) -> PromptEncoder:
    config.fill_from_model_config(base.config)
    return PromptEncoder(config)
