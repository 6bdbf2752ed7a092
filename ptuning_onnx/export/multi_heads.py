"""Per-adapter task heads in a multi-prompt graph (seq-cls, token-cls): one shared body, every adapter's head.

A seq-cls or token-cls adapter carries its own trained head (PEFT's ``modules_to_save``: ``classifier``,
``score``, DistilBERT's ``pre_classifier`` + ``classifier``, RoBERTa's ``classifier.dense`` + ``out_proj``, ...).
The base body is frozen and shared, so the graph runs it ONCE over the mixed batch; each head module is then
replaced by :class:`PerRowHeads`, which applies all K adapters' copies of that module to the rows and keeps, per row,
the output of the row's adapter (``prompt_ids``).

Why every head on every row rather than gathering stacked weights per row: it works for any head module, not only a
plain ``Linear`` (RoBERTa's head has a dense layer and tanh, DistilBERT's two modules with a ReLU between, and the
hooks where transformers calls them stay its own), it is exact (``Where`` picks values; no arithmetic on them), and
its cost is tiny: K heads of D x labels on B rows beside a transformer body. The selection is per row, so a mixed
batch costs one body pass whatever its adapters. Quantization passes see K constant head weights, as in K single
exports.

Heads with different label counts: each row's output is padded to the largest count with ``LABEL_PAD``, a finite
stand-in for -inf (softmax gives it 0, arg-max never picks it, exact in fp16); the manifest records each adapter's
count and labels and the runtime cuts each row to its adapter's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

LABEL_PAD = -1.0e4


class PerRowHeads(nn.Module):
    """K copies of one head module; row b gets copy ``rows[b]``'s output, padded on the last axis to the widest.

    ``rows`` (B,) int64 is set by the graph around each forward (the module is called by transformers' own forward,
    which cannot pass it). Input (B, ...) -> output (B, ..., max labels)."""

    def __init__(self, heads: list):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.rows = None

    def forward(self, *args, **kwargs):
        if self.rows is None:
            raise RuntimeError("PerRowHeads.rows is not set: the multi-prompt graph sets it around each forward")
        outs = [head(*args, **kwargs) for head in self.heads]
        width = max(out.shape[-1] for out in outs)
        outs = [out if out.shape[-1] == width else nn.functional.pad(out, (0, width - out.shape[-1]), value=LABEL_PAD)
                for out in outs]
        rows = self.rows.view(-1, *([1] * (outs[0].dim() - 1)))  # (B, 1, ...)
        picked = outs[0]
        for k in range(1, len(outs)):
            picked = torch.where(rows == k, outs[k], picked)
        return picked


def with_modules(root: nn.Module, modules: dict, **attributes) -> nn.Module:
    """A shallow copy of ``root`` with ``modules`` ({dotted path: module}) in place of its own; every other module,
    parameter and buffer is shared, so the copy costs no weights. ``attributes`` are set on the copy only."""
    clone = copy.copy(root)
    clone._modules = dict(root._modules)
    nested: dict = {}
    for path, module in modules.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = module
        else:
            clone._modules[head] = module
    for head, inner in nested.items():
        clone._modules[head] = with_modules(root._modules[head], inner)
    for name, value in attributes.items():
        setattr(clone, name, value)
    return clone


def head_paths(base: nn.Module, adapters: list) -> list:
    """Modules each adapter brings its own of: those holding any adapter's head weights (``modules_to_save``, e.g.
    ``classifier`` or RoBERTa's ``classifier.dense`` and ``classifier.out_proj``), plus the base's fresh heads.
    Read from the weights rather than from names, so a base whose checkpoint already has a classifier still gets
    each adapter's."""
    from ..reference import head_modules

    found = {key.rpartition(".")[0] for adapter in adapters for key in adapter.head_weights}
    found.update(head_modules(base))
    # A module inside another one already listed is replaced with it.
    return sorted(p for p in found if p and not any(p.startswith(q + ".") for q in found if q != p))


def own_modules(refs: list) -> list:
    """Paths of the modules whose parameters are not all shared between the references (their heads)."""
    first = dict(refs[0].base.named_parameters(remove_duplicate=False))
    others = [dict(ref.base.named_parameters(remove_duplicate=False)) for ref in refs[1:]]
    found = {name.rpartition(".")[0] for name, param in first.items() if any(o.get(name) is not param for o in others)}
    return sorted(p for p in found if not any(p.startswith(q + ".") for q in found if q != p))


class RowHeads:
    """The multi-prompt graph's view of a task reference whose head modules are :class:`PerRowHeads`.

    ``ref``: a reference over the shared body (its ``task_forward`` gives the task's outputs); ``heads``: the
    ``PerRowHeads`` inside it, whose ``rows`` :meth:`select` sets for one forward."""

    def __init__(self, refs: list):
        first = refs[0]
        paths = own_modules(refs)
        self.heads = [PerRowHeads([ref.base.get_submodule(path) for ref in refs]) for path in paths]
        base = with_modules(first.base, dict(zip(paths, self.heads, strict=True)))
        self.ref = with_modules(first, {"base": base})

    def select(self, rows: torch.Tensor):
        """Context: the heads pick ``rows`` (B,) for the forward inside it."""
        return _Selected(self.heads, rows)


class _Selected:
    def __init__(self, heads: list, rows):
        self.heads, self.rows = heads, rows

    def __enter__(self):
        for head in self.heads:
            head.rows = self.rows

    def __exit__(self, *_):
        for head in self.heads:
            head.rows = None


def label_info(ref) -> dict:
    """``{"num_labels", "id2label"}`` of a classification reference's own head (its base config)."""
    config = ref.base.config
    return {"num_labels": int(config.num_labels), "id2label": {str(k): str(v) for k, v in config.id2label.items()}}
