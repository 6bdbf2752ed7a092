"""Training checkpoints: what one holds, the order it is written in, and the checks before writing or resuming.

A checkpoint is the output folder itself (layout in train.py): ``training_state/`` (all that resume reads), the
PEFT-format adapter, and ``training_log.json`` (+ ``loss.png``). Each of the three writes is atomic, and they go in
that order, so a kill between two of them loses at most the newest adapter or log, never consistency. A checkpoint
never holds a NaN or an infinite number: the caller checks ``non_finite_part`` first.

Weights are the prompt encoder's ``state_dict`` plus the classification head's, prefixed ``head.``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Optional

import torch

from ._fs import check_target, recover_interrupted
from .adapter import CONFIG_NAME, Adapter, load_training_state, save_adapter, save_training_state
from .errors import ConfigError
from .reference import PTuningModel, apply_head_weights, head_state

LOG_NAME = "training_log.json"
PLOT_NAME = "loss.png"
STATE_FORMAT = 1
# Arguments that define the optimisation trajectory; a resume that changes one would not match any single run.
# epochs, max_steps, eval_file, device and quiet may change between runs.
RUN_DEFINING = ("task", "num_virtual_tokens", "encoder_type", "encoder_hidden_size", "encoder_num_layers",
                "encoder_dropout", "batch_size", "learning_rate", "grad_accum", "seed", "mixed_precision",
                "template")
HEAD_PREFIX = "head."


def check_output(output: Path, *, resume: bool) -> Optional[dict]:
    """The checkpoint to resume from, or None for a fresh run; refuses to silently overwrite a checkpoint."""
    check_target(output)  # not the current folder or one above it, not a file
    recover_interrupted(output)  # whatever a run killed inside a checkpoint write left beside the folder
    state = load_training_state(output) if output.is_dir() else None
    if resume and state is None:
        raise ConfigError(f"--resume given but {output} holds no checkpoint (training_state/state.json)")
    if not resume and state is not None:
        raise ConfigError(f"{output} already holds a training checkpoint; pass --resume to continue it, or choose "
                          f"another --output")
    if state is None and (output / CONFIG_NAME).is_file():
        raise ConfigError(f"{output} already holds an adapter ({CONFIG_NAME}) that training would overwrite; "
                          f"choose another --output")
    return state


def check_resumable(meta: dict, args: dict, train_hash: str, output: Path) -> None:
    """Refuse a resume whose checkpoint format, run-defining arguments (``args``: the new run's, as a dict) or
    training file differ from the checkpoint's."""
    if meta.get("format") != STATE_FORMAT:
        raise ConfigError(f"checkpoint in {output} has format {meta.get('format')!r}; expected {STATE_FORMAT}")
    saved = meta.get("args", {})
    for name in RUN_DEFINING:
        if name in saved and saved[name] != args[name]:
            raise ConfigError(f"cannot resume: --{name.replace('_', '-')} was {saved[name]!r} in the checkpoint, "
                              f"now {args[name]!r}")
    if meta.get("train_sha256") != train_hash:
        raise ConfigError(f"cannot resume: {args['train_file']} differs from the training file of the checkpoint")


def model_weights(model: PTuningModel) -> dict:
    """The trained weights: the encoder's ``state_dict`` and the head's (``head.<name>``)."""
    weights = dict(model.encoder.state_dict())
    weights.update({HEAD_PREFIX + k: v for k, v in head_state(model.base).items()})
    return weights


def all_finite(tensors) -> bool:
    """Whether every float tensor (``None`` skipped) is free of NaN and inf; one device sync for all of them."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None and t.is_floating_point()]
    return not flags or bool(torch.stack(flags).all())


def non_finite_part(adapter: Adapter, weights: dict, optimizer: torch.optim.Optimizer) -> Optional[str]:
    """The first part of a would-be checkpoint that holds NaN or inf ("prompt table", "weights" or "optimizer
    state"), or None. Finite weights can still overflow in the encoder: the prompt table is checked too."""
    moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    for what, values in (("prompt table", [adapter.prompt_embeddings]), ("weights", weights.values()),
                         ("optimizer state", moments)):
        if not all_finite(values):
            return what
    return None


def save_checkpoint(output: Path, *, weights: dict, adapter: Adapter, optimizer: torch.optim.Optimizer,
                    scaler: Optional[torch.amp.GradScaler], device: torch.device, meta: dict, log: dict,
                    plot: bool = True) -> None:
    """Training state first, then the adapter, then the log: each write is atomic, and resume reads only the
    training state, so a crash between two writes loses at most the newest adapter/log, never consistency.

    ``meta``: the run's counters and history (``step``, ``epoch``, ``steps_in_epoch``, ``steps``, ``evals``,
    ``args``, ``train_sha256``); the format and the RNG states are added here. ``plot=False`` skips redrawing
    loss.png (~0.1 s), for frequent mid-epoch checkpoints."""
    py_version, py_state, py_gauss = random.getstate()
    rng = {"torch_cpu": torch.get_rng_state(), "python_random": torch.tensor(py_state, dtype=torch.int64)}
    if device.type == "cuda":
        rng["torch_cuda"] = torch.cuda.get_rng_state(device)
    meta = dict(meta, format=STATE_FORMAT, python_random={"version": py_version, "gauss_next": py_gauss})
    save_training_state(output, encoder_state=weights, optimizer_state=optimizer.state_dict(),
                        scaler_state=scaler.state_dict() if scaler is not None else None, meta=meta, rng=rng)
    save_adapter(output, adapter)
    write_log(output, log, plot=plot)


def load_checkpoint(state: dict, *, model: PTuningModel, optimizer: torch.optim.Optimizer,
                    scaler: Optional[torch.amp.GradScaler], device: torch.device) -> dict:
    """Put the weights, optimizer, scaler and RNG states of ``state`` (from ``check_output``) back; returns its
    meta (counters and history)."""
    meta, weights = state["meta"], state["encoder"]
    head = {k[len(HEAD_PREFIX):]: v for k, v in weights.items() if k.startswith(HEAD_PREFIX)}
    model.encoder.load_state_dict({k: v for k, v in weights.items() if not k.startswith(HEAD_PREFIX)})
    apply_head_weights(model.base, head)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(state["rng"]["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["torch_cuda"], device)
    py = meta["python_random"]
    random.setstate((py["version"], tuple(state["rng"]["python_random"].tolist()), py["gauss_next"]))
    return meta


def write_log(output: Path, log: dict, *, plot: bool = True) -> None:
    """``training_log.json`` (``log`` plus the versions that made it), then loss.png unless ``plot`` is False."""
    import transformers

    log = dict(log, versions={"torch": torch.__version__, "transformers": transformers.__version__})
    tmp = output / f".{LOG_NAME}.tmp"
    tmp.write_text(json.dumps(log, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, output / LOG_NAME)
    if plot:
        _plot(log["steps"], log["evals"], output / PLOT_NAME)


def _plot(steps: list, evals: list, path: Path) -> None:
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    except ImportError:
        return
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train loss (per step)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, path)
