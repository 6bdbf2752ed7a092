"""P-tuning training: a frozen base, a trained prompt encoder (plus a new head for classification), exact resume.

Data order is a pure function of ``(seed, epoch)``: each epoch shuffles with a ``torch.Generator`` seeded with
``seed + epoch``. A checkpoint therefore needs only the epoch and the number of optimizer steps taken in it, plus
the weights, the optimizer and the RNG states (dropout), to continue exactly where an uninterrupted run would be.
Checkpoints are written after every epoch (and every ``save_steps`` steps), so a killed run resumes from the last.

A loss, gradient or weight that turns NaN or infinite raises :class:`TrainingDivergedError` before anything more is
written: the folder keeps the last good checkpoint, and no checkpoint ever holds a non-finite number. What a
checkpoint holds, and how it is written and checked, is in checkpoint.py.

Output folder (``--output``)::

    adapter_config.json, adapter_model.safetensors, labels.json    PEFT-format adapter (see adapter.py)
    training_state/      encoder + head weights, AdamW state, RNG states, loss history: all that resume reads
    training_log.json    per-step loss, per-epoch eval metric, arguments, seed, versions
    loss.png             loss curve, when matplotlib is installed
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import distributed as dist_
from .adapter import Adapter
from .checkpoint import (LOG_NAME, PLOT_NAME, RUN_DEFINING, STATE_FORMAT, all_finite, check_output, check_resumable,
                         load_checkpoint, model_weights, non_finite_part, save_checkpoint)
from .manifest import sha256_file
from .config import PromptEncoderConfig, TaskType, parse_task
from .dataset import BaseInfo, TaskData, collate, collect_labels, inspect_base, load_task_data
from .errors import ConfigError, TrainingDivergedError
from .reference import PTuningModel, freeze_base, head_modules, head_state, load_base, new_encoder
from .reference_template import reference_for
from .template import parse as parse_template

__all__ = ["LOG_NAME", "PLOT_NAME", "RUN_DEFINING", "STATE_FORMAT", "TrainArgs", "TrainResult", "epoch_order",
           "evaluate", "resolve_device", "train"]


@dataclass
class TrainArgs:
    """The ``ptuning-train`` flags, one field per flag."""

    base_model: str = field(metadata={"help": "Folder of the frozen base model (config.json + safetensors)"})
    task: str = field(metadata={"help": "causal-lm, seq-cls, token-cls or seq2seq-lm"})
    train_file: str = field(metadata={"help": "JSONL training rows"})
    output: str = field(metadata={"help": "Folder for the adapter, the checkpoint and the log"})
    eval_file: Optional[str] = field(default=None, metadata={"help": "JSONL rows evaluated after every epoch"})
    num_virtual_tokens: int = field(default=20, metadata={"help": "Number of virtual tokens"})
    template: Optional[str] = field(default=None, metadata={
        "help": "P-tuning template, e.g. '<p:4> {text} <p:3> It was' (template.py); its slots set the number of "
                "virtual tokens"})
    encoder_type: str = field(default="mlp", metadata={"help": "Prompt encoder: mlp or lstm"})
    encoder_hidden_size: Optional[int] = field(default=None, metadata={"help": "Encoder width (default: model's)"})
    encoder_num_layers: int = field(default=2, metadata={"help": "LSTM layers (the MLP always has 2)"})
    encoder_dropout: float = field(default=0.0, metadata={"help": "LSTM dropout"})
    epochs: int = field(default=3, metadata={"help": "Passes over the training file"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "Stop after this many optimizer steps"})
    save_steps: Optional[int] = field(default=None, metadata={"help": "Also checkpoint every N optimizer steps "
                                                                      "(default: after every epoch only)"})
    batch_size: int = field(default=8, metadata={"help": "Rows per forward pass"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    grad_accum: int = field(default=1, metadata={"help": "Forward passes per optimizer step"})
    seed: int = field(default=42, metadata={"help": "Seed for initialisation, data order and dropout"})
    resume: bool = field(default=False, metadata={"help": "Continue from the checkpoint in --output"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    mixed_precision: bool = field(default=False, metadata={"help": "bf16 autocast on CPU; fp16 + GradScaler on CUDA"})
    quiet: bool = field(default=False, metadata={"help": "No progress bar or per-epoch lines"})

    def __post_init__(self) -> None:
        parse_task(self.task)  # raises with the allowed names
        if self.encoder_type.lower() not in ("mlp", "lstm"):
            raise ConfigError(f"encoder_type must be mlp or lstm, got {self.encoder_type!r}")
        for name in ("num_virtual_tokens", "epochs", "batch_size", "grad_accum", "max_steps", "save_steps",
                     "encoder_hidden_size", "encoder_num_layers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < math.inf):
            raise ConfigError(f"learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
        if self.template is not None:
            parsed = parse_template(self.template)  # TemplateError (a ConfigError) names the problem
            if parse_task(self.task) not in (TaskType.SEQ_CLS, TaskType.CAUSAL_LM):
                raise ConfigError(f"--template trains seq-cls and causal-lm, not {self.task}")
            self.num_virtual_tokens = parsed.num_virtual_tokens  # one encoder makes every slot's tokens
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class TrainResult:
    output: Path
    adapter: Adapter
    step: int  # optimizer steps taken in total
    epoch: int  # epochs completed
    steps: list  # [{"step", "epoch", "loss"}], one per optimizer step
    evals: list  # [{"epoch", "loss", "accuracy" | "perplexity"}]; epoch 0 = before training
    labels: Optional[list] = None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        built = "a CUDA build" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"--device cuda requested but no CUDA device is available (torch {torch.__version__} is "
                          f"{built}); use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def padding_side(model: PTuningModel) -> str:
    """Training and evaluation pad causal LMs on the right: a row's first text token is then scored from the last
    virtual token, as when the row is alone. Left padding (what generation uses) would score it from a pad position,
    so a row's loss would depend on the rows batched with it. The rest pad as the model needs."""
    return "right" if model.task == TaskType.CAUSAL_LM else model.padding_side


def epoch_order(num_examples: int, batch_size: int, seed: int, epoch: int) -> list:
    """Batches of example indices for ``epoch``: a pure function of its arguments, which makes resume exact."""
    generator = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(num_examples, generator=generator).tolist()
    return [perm[i:i + batch_size] for i in range(0, num_examples, batch_size)]


@torch.no_grad()
def evaluate(model: PTuningModel, data: TaskData, *, batch_size: int = 8, pad_id: int = 0,
             device: Optional[torch.device] = None, autocast_dtype: Optional[torch.dtype] = None) -> dict:
    """Held-out metrics in file order: ``{"loss", "accuracy"}`` for classification (token-level for token-cls,
    ignoring -100), ``{"loss", "perplexity"}`` (per target token) for causal-lm and seq2seq-lm."""
    device = device or next(model.parameters()).device
    # Restore each module's own mode afterwards: training keeps the frozen base in eval mode under a module that
    # is in train mode, and a blanket model.train() would switch the base's dropout on.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    side = padding_side(model)
    nll = count = correct = 0.0
    try:
        for start in range(0, len(data), batch_size):
            batch = collate(data.examples[start:start + batch_size], model.task, pad_id=pad_id, padding_side=side)
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(device, autocast_dtype):
                out = model(**batch)
            labels = batch["labels"]
            if model.task == TaskType.SEQ_CLS:
                n_items = labels.numel()
                correct += (out.logits.argmax(-1) == labels).sum().item()
            else:
                mask = labels != -100
                n_items = mask.sum().item()
                if model.task == TaskType.TOKEN_CLS:
                    correct += ((out.logits.argmax(-1) == labels) & mask).sum().item()
            # The model's loss is a mean over the batch's items; re-weight so the metric is a mean over the file.
            nll += out.loss.float().item() * n_items
            count += n_items
    finally:
        for module, mode in modes:
            module.training = mode
    loss = nll / max(count, 1)
    if model.task in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS):
        return {"loss": loss, "accuracy": correct / max(count, 1)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def train(args: TrainArgs) -> TrainResult:
    """Train (or resume) as ``args`` says and write the adapter, checkpoint and log to ``args.output``."""
    task = parse_task(args.task)
    output = Path(args.output)
    world = dist_.from_env()  # torchrun / accelerate launch; a world of one otherwise (distributed.py)
    device = dist_.init(world, resolve_device(args.device))
    try:
        return _train(args, task, output, world, device)
    finally:
        dist_.finish(world)


def _train(args: TrainArgs, task: TaskType, output: Path, world: dist_.World, device: torch.device) -> TrainResult:
    # Rank 0 checks (and may tidy) the output folder before the other ranks read it.
    state = check_output(output, resume=args.resume) if world.main else None
    dist_.barrier(world)
    if not world.main:
        state = check_output(output, resume=args.resume)

    # Everything about the data is checked before the model is even loaded.
    if not (Path(args.base_model) / "config.json").is_file():
        raise ConfigError(f"--base-model {args.base_model} is not a model folder (no config.json)")
    info = inspect_base(args.base_model)
    labels = collect_labels(args.train_file, task) if task in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS) else None
    template = parse_template(args.template) if args.template else None
    virtual = template.leading if template is not None else args.num_virtual_tokens  # positions before the input
    train_data = load_task_data(args.train_file, task, info, num_virtual_tokens=virtual, labels=labels,
                                template=template)
    eval_data = None
    if args.eval_file:
        eval_data = load_task_data(args.eval_file, task, info, num_virtual_tokens=virtual, labels=labels,
                                   template=template)
    train_hash = sha256_file(args.train_file)
    if state is not None:
        check_resumable(state["meta"], asdict(args), train_hash, output)

    with _deterministic(device):
        random.seed(args.seed)
        torch.manual_seed(args.seed)  # the new head's and the encoder's initialisation
        base = load_base(args.base_model, task, labels=labels, pad_token_id=info.pad_id)
        config = PromptEncoderConfig(
            num_virtual_tokens=args.num_virtual_tokens, encoder_reparameterization_type=args.encoder_type,
            encoder_hidden_size=args.encoder_hidden_size, encoder_num_layers=args.encoder_num_layers,
            encoder_dropout=args.encoder_dropout, task_type=task, base_model_name_or_path=str(args.base_model),
            modules_to_save=head_modules(base) or None)
        model = reference_for(base, new_encoder(config, base), task, template)
        params = freeze_base(model)
        model.to(device)
        base.eval()  # frozen: its dropout would only add noise; the encoder's own dropout stays on
        model.encoder.train()
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
        use_amp = args.mixed_precision
        amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if use_amp else None
        scaler = torch.amp.GradScaler("cuda") if use_amp and device.type == "cuda" else None
        run = _Run(args=args, task=task, output=output, info=info, config=config, model=model, optimizer=optimizer,
                   scaler=scaler, device=device, amp_dtype=amp_dtype, labels=labels, train_hash=train_hash,
                   train_data=train_data, eval_data=eval_data, world=world)
        if state is not None:
            run.restore(state)
        elif eval_data is not None:
            run.evaluate_epoch(0, None)  # the untrained prompt, as the baseline
        run.loop()
    return TrainResult(output=output, adapter=run.adapter(), step=run.step, epoch=run.epoch, steps=run.steps,
                       evals=run.evals, labels=labels)


@dataclass
class _Run:
    """Mutable state of one training run; everything a checkpoint saves lives here."""

    args: TrainArgs
    task: TaskType
    output: Path
    info: BaseInfo
    config: PromptEncoderConfig
    model: PTuningModel
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    labels: Optional[list]
    train_hash: str
    train_data: TaskData
    eval_data: Optional[TaskData]
    world: dist_.World = field(default_factory=dist_.World)
    step: int = 0
    epoch: int = 0  # epochs completed
    steps_in_epoch: int = 0  # optimizer steps already taken in epoch ``epoch`` (mid-epoch checkpoint)
    steps: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    saved_step: Optional[int] = None  # step of the newest checkpoint on disk, for the divergence message

    def say(self, message: str) -> None:
        if not self.args.quiet and self.world.main:
            from tqdm import tqdm

            tqdm.write(message)

    def loop(self) -> None:
        from tqdm import tqdm

        args = self.args
        groups_per_epoch = math.ceil(math.ceil(len(self.train_data) / args.batch_size) / args.grad_accum)
        total = args.epochs * groups_per_epoch
        if args.max_steps is not None:
            total = min(total, args.max_steps)
        bar = tqdm(total=total, initial=min(self.step, total), unit="step", dynamic_ncols=True,
                   disable=args.quiet or not sys.stderr.isatty() or not self.world.main)
        try:
            while self.epoch < args.epochs and self.step < total:
                batches = epoch_order(len(self.train_data), args.batch_size, args.seed, self.epoch)
                groups = [batches[i:i + args.grad_accum] for i in range(0, len(batches), args.grad_accum)]
                for group in groups[self.steps_in_epoch:]:  # skip what a mid-epoch checkpoint already did
                    loss = self.optimizer_step(group)
                    self.step += 1
                    self.steps_in_epoch += 1
                    self.steps.append({"step": self.step, "epoch": self.epoch + 1, "loss": loss})
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", epoch=self.epoch + 1)
                    if self.step >= total:
                        break
                    if args.save_steps and self.step % args.save_steps == 0 and self.steps_in_epoch < len(groups):
                        self.checkpoint(plot=False)  # mid-epoch; the epoch's last step is checkpointed below
                if self.steps_in_epoch == len(groups):
                    self.epoch += 1
                    self.steps_in_epoch = 0
                    epoch_losses = [s["loss"] for s in self.steps if s["epoch"] == self.epoch]
                    self.evaluate_epoch(self.epoch, sum(epoch_losses) / max(len(epoch_losses), 1))
                self.checkpoint()
        finally:
            bar.close()

    def optimizer_step(self, group: list) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns their mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        side = padding_side(self.model)
        total = 0.0
        where = f"step {self.step + 1} (epoch {self.epoch + 1})"
        world = self.world
        for indices in group:
            # In a world of N, this rank's rows of the global micro-batch; its loss is weighted by its share of the
            # loss items so that the summed gradients are the one-process mean (distributed.py).
            examples = [self.train_data.examples[i] for i in dist_.shard(indices, world)]
            batch = None
            if examples:
                batch = collate(examples, self.task, pad_id=self.info.pad_id, padding_side=side)
                batch = {k: v.to(self.device) for k, v in batch.items()}
            items = dist_.loss_items(batch, self.task) if batch is not None else 0
            everyone = dist_.all_sum(float(items), world, self.device) if world.distributed else float(items)
            with _autocast(self.device, self.amp_dtype):
                if batch is not None:
                    loss = self.model(**batch).loss.float()
                else:  # no row here (a micro-batch smaller than the world): the prompt encoder still runs once,
                    # as on every other rank, so the ranks' dropout RNGs stay in step; its gradient is zero
                    loss = self.model.prompt_embeds(1).float().sum() * 0.0
            share = items / everyone if world.distributed and everyone > 0 else 1.0
            value = loss.item()
            if world.distributed:
                value = dist_.all_sum(value * items, world, self.device) / max(everyone, 1.0)
            if not math.isfinite(value):
                rows = sorted(e.row for e in examples)  # for when a row, not the rate, is the cause
                named = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
                raise self.diverged(where, f"the training loss is {value} (rows {named} of {self.args.train_file})")
            scaled = loss * share / len(group)  # a partial last group still averages over what it has
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += value
        dist_.sum_gradients([p for g in self.optimizer.param_groups for p in g["params"]], world)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself when a (scaled) gradient overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        # One check covers the gradients too: AdamW turns a NaN or infinite gradient into a NaN weight.
        if not all_finite(p for g in self.optimizer.param_groups for p in g["params"]):
            raise self.diverged(where, f"a weight is NaN or infinite after the update (a non-finite gradient or an "
                                       f"overflowing step; the loss was {total / len(group):.6g})")
        return total / len(group)

    def diverged(self, where: str, problem: str) -> TrainingDivergedError:
        kept = (f"{self.output} keeps the last good checkpoint (step {self.saved_step})"
                if self.saved_step is not None else f"no checkpoint was written to {self.output}")
        return TrainingDivergedError(f"training diverged at {where}: {problem}; {kept}; try a lower "
                                     f"--learning-rate in a new --output (a resume must keep the rate)")

    def evaluate_epoch(self, epoch: int, train_loss: Optional[float]) -> None:
        line = "before training" if epoch == 0 else f"epoch {epoch}/{self.args.epochs}: train loss {train_loss:.4f}"
        if self.eval_data is not None:
            metrics = evaluate(self.model, self.eval_data, batch_size=self.args.batch_size, pad_id=self.info.pad_id,
                               device=self.device, autocast_dtype=self.amp_dtype)
            if not math.isfinite(metrics["loss"]):
                where = "the start (no step taken)" if epoch == 0 else f"the end of epoch {epoch} (step {self.step})"
                raise self.diverged(where, f"the held-out loss is {metrics['loss']} on {self.args.eval_file}")
            self.evals.append(dict(epoch=epoch, **metrics))
            name = "accuracy" if "accuracy" in metrics else "perplexity"
            line += f", eval loss {metrics['loss']:.4f}, eval {name} {metrics[name]:.4f}"
        self.say(line)

    def adapter(self) -> Adapter:
        return Adapter(config=self.config, prompt_embeddings=self.model.encoder.bake().cpu(),
                       head_weights=head_state(self.model.base), labels=self.labels, template=self.args.template)

    # ---- checkpoints (see checkpoint.py) ---------------------------------------------------------------------

    def checkpoint(self, plot: bool = True) -> None:
        """Write the checkpoint (training state, adapter, log); ``plot=False`` skips redrawing loss.png."""
        weights = model_weights(self.model)
        adapter = self.adapter()
        bad = non_finite_part(adapter, weights, self.optimizer)
        if bad is not None:
            where = f"step {self.step} (epoch {self.steps[-1]['epoch'] if self.steps else self.epoch})"
            raise self.diverged(where, f"the checkpoint's {bad} holds NaN or infinite values")
        meta = {"step": self.step, "epoch": self.epoch, "steps_in_epoch": self.steps_in_epoch, "steps": self.steps,
                "evals": self.evals, "args": asdict(self.args), "train_sha256": self.train_hash}
        log = {"args": asdict(self.args), "seed": self.args.seed, "task": self.task.value, "labels": self.labels,
               "step": self.step, "epochs_completed": self.epoch, "steps": self.steps, "evals": self.evals,
               "train_sha256": self.train_hash}
        if self.world.main:  # every rank holds the same weights; one writes them
            save_checkpoint(self.output, weights=weights, adapter=adapter, optimizer=self.optimizer,
                            scaler=self.scaler, device=self.device, meta=meta, log=log, plot=plot)
        dist_.barrier(self.world)
        self.saved_step = self.step

    def restore(self, state: dict) -> None:
        meta = load_checkpoint(state, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                               device=self.device)
        self.step, self.epoch, self.steps_in_epoch = meta["step"], meta["epoch"], meta["steps_in_epoch"]
        self.steps, self.evals = meta["steps"], meta["evals"]
        self.saved_step = self.step
        self.say(f"resuming from {self.output}: step {self.step}, epoch {self.epoch}")


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _deterministic(device: torch.device):
    """Deterministic kernels for the run only; warn_only because a few CUDA kernels have no deterministic twin."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reproducibility needs it
    previous, previous_warn = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


if __name__ == "__main__":
    from .cli.train import main

    sys.exit(main())
