"""The PyTorch reference for a template (template.py): virtual tokens anywhere, around anchor words.

``TemplatePTuningModel`` is a :class:`PTuningModel` whose prompt has ``N`` rows, all from ONE encoder (or one baked
table), numbered across the template's slots left to right. The template's leading slot (its first ``n`` rows, 0
when the template opens with text) is the prefix that ``PTuningModel`` already places: before the model's special
tokens, keys/values precomputable for causal LMs. Every other slot arrives inside ``input_ids`` as placeholder ids
``vocab_size + k``, and ``embed_tokens`` swaps in row ``k`` of the prompt there (``torch.where``, so the same code
traces into the ONNX graph: the way TensorRT-LLM's prompt tables map ids past the vocabulary).

So a prefix-only template (``<p:n> {text}``) is exactly the plain prefix model, which is exactly PEFT's, and
placeholders sit at ordinary user positions: a padded row still gives what it gives alone.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from .config import TaskType
from .encoder import PromptEncoder
from .errors import ConfigError
from .reference import PTuningModel
from .template import Template, parse

TEMPLATE_TASKS = (TaskType.CAUSAL_LM, TaskType.SEQ_CLS, TaskType.FEATURE_EXTRACTION)


class TemplatePTuningModel(PTuningModel):
    """``PTuningModel`` plus inline virtual slots.

    Input shape: ``input_ids`` (B, L) with placeholders ``vocab_size + k`` (n <= k < N) at the inline slots.
    Output shape: as ``PTuningModel``'s: every user position, inline slots included; the leading n are not output.
    """

    def __init__(self, base: nn.Module, prompt: Union[PromptEncoder, torch.Tensor], task: TaskType,
                 template: Union[str, Template]):
        template = template if isinstance(template, Template) else parse(template)
        total = template.num_virtual_tokens
        task = TaskType(task)
        if task not in TEMPLATE_TASKS:  # token-cls and seq2seq-lm are not done
            raise ConfigError(f"templates are supported for {', '.join(t.value for t in TEMPLATE_TASKS)}, not "
                              f"{task.value}")
        rows = prompt.total_virtual_tokens if isinstance(prompt, PromptEncoder) else prompt.shape[0]
        if rows < total:
            raise ConfigError(f"template {template.source!r} has {total} virtual tokens but the prompt has "
                              f"{rows} rows")
        super().__init__(base, prompt, task, num_virtual_tokens=total)
        self.template = template
        self.vocab_size = int(base.get_input_embeddings().weight.shape[0])
        self.num_virtual_tokens = self.template.leading  # n: what PTuningModel prepends and positions count

    def prompt_rows(self) -> torch.Tensor:
        """(N, D) every virtual token of the template, in the base's dtype."""
        if self.encoder is not None:
            idx = torch.arange(self.encoder.total_virtual_tokens, device=self.encoder.embedding.weight.device)
            rows = self.encoder(idx.unsqueeze(0))[0]
        else:
            rows = self.table
        return rows[: self.template.num_virtual_tokens].to(self.base.dtype)

    def prompt_embeds(self, batch: int) -> torch.Tensor:
        """(batch, n, D): the leading slot only (the prefix)."""
        return self.prompt_rows()[: self.n].unsqueeze(0).expand(batch, -1, -1)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D): vocabulary embeddings, and prompt row ``id - vocab_size`` where ``id >= vocab_size``."""
        virtual = input_ids >= self.vocab_size
        words = self.base.get_input_embeddings()(torch.where(virtual, torch.zeros_like(input_ids), input_ids))
        rows = self.prompt_rows()
        index = (input_ids - self.vocab_size).clamp(min=0, max=rows.shape[0] - 1)
        return torch.where(virtual.unsqueeze(-1), rows[index].to(words.dtype), words)

    def with_prompt(self, table: torch.Tensor) -> "TemplatePTuningModel":
        """The same base and template over another (N, D) table (parity's negative control)."""
        return TemplatePTuningModel(self.base, table, self.task, self.template).eval()

    def describe(self, base_dir) -> dict:
        """The manifest's ``template`` entry (docs/FORMAT.md); ``special_tokens``: what the base's tokenizer puts
        around a text, so that a runtime without transformers wraps a rendered row the way training did."""
        from .dataset import load_tokenizer
        from .template_data import tokenizer_specials

        tokenizer = load_tokenizer(base_dir)
        prefix, suffix = tokenizer_specials(tokenizer) if tokenizer is not None else ((), ())
        return {"source": self.template.source, "num_virtual_tokens": self.template.num_virtual_tokens,
                "leading": self.n, "placeholder_base": self.vocab_size, "fields": list(self.template.fields),
                "inline_slots": [list(slot) for slot in self.template.inline_slots],
                "special_tokens": {"prefix": list(prefix), "suffix": list(suffix)}}


def reference_for(base: nn.Module, prompt, task: TaskType, template=None) -> PTuningModel:
    """The reference for an adapter: a ``TemplatePTuningModel`` when it has a template, else ``PTuningModel``."""
    if template is None:
        return PTuningModel(base, prompt, task)
    return TemplatePTuningModel(base, prompt, task, template)
