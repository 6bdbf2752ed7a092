"""``ptuning-train``: P-tune a frozen base model on a JSONL file (a thin layer over :func:`ptuning_onnx.train.train`).

Torch is imported only after the arguments parse, so ``--help`` and usage errors are instant.

Exit status: 0 trained; 1 training diverged (a NaN or infinite loss, gradient or weight: ``--output`` keeps its last
good checkpoint, or stays unwritten); 2 bad usage or input (flags, files, data rows, a checkpoint that cannot be
resumed); 3 internal error (see ``_common``); 130 interrupted. Every failure is one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..config import CLI_TASKS
from ..errors import ConfigError, TrainingDivergedError
from ._common import error_message, run_cli

EXIT_FAILED = 1  # the input was usable but the run failed; 2 (bad input) comes from run_cli

TRAIN_TASKS = [name for name in CLI_TASKS if name != "feature-extraction"]  # no training objective for it
# Defaults mirror TrainArgs (a test checks they agree); duplicated so --help does not import torch.
DEFAULTS = dict(num_virtual_tokens=20, template=None, encoder_type="mlp", encoder_hidden_size=None, encoder_num_layers=2,
                encoder_dropout=0.0, epochs=3, max_steps=None, save_steps=None, batch_size=8, learning_rate=1e-3,
                grad_accum=1, seed=42, device="auto")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ptuning-train",
        description="P-tune a frozen base model: trains a prompt encoder (and a new head for classification) and "
                    "writes a PEFT-format adapter, a resumable checkpoint and a training log to --output.",
        epilog="exit status: 0 trained; 1 training diverged (NaN or infinite loss, gradient or weight; --output "
               "keeps its last good checkpoint); 2 bad usage or input; 3 internal error (traceback in a log file); "
               "130 interrupted. A killed run continues from its last checkpoint with --resume.")
    p.set_defaults(**DEFAULTS)
    req = p.add_argument_group("required")
    req.add_argument("--base-model", required=True, metavar="DIR", help="base model folder (config.json, safetensors)")
    req.add_argument("--task", required=True, choices=TRAIN_TASKS)
    req.add_argument("--train-file", required=True, metavar="F.jsonl", help="training rows, one JSON object a line")
    req.add_argument("--output", required=True, metavar="DIR", help="adapter, checkpoint and log go here")
    p.add_argument("--eval-file", metavar="F.jsonl", help="held-out rows, evaluated before training and per epoch")
    enc = p.add_argument_group("prompt encoder")
    enc.add_argument("--num-virtual-tokens", type=int, metavar="N", help="virtual tokens (default: %(default)s)")
    enc.add_argument("--template", metavar="T",
                     help="P-tuning template: virtual slots <p:k>, row fields {text}, anchor words, e.g. "
                          "'<p:10> {text} <p:10> It was' (seq-cls, causal-lm); its slots set the number of virtual "
                          "tokens (a different --num-virtual-tokens is an error)")
    enc.add_argument("--encoder-type", choices=["mlp", "lstm"], help="(default: %(default)s)")
    enc.add_argument("--encoder-hidden-size", type=int, metavar="N", help="(default: the model's hidden size)")
    enc.add_argument("--encoder-num-layers", type=int, metavar="N", help="LSTM layers (default: %(default)s)")
    enc.add_argument("--encoder-dropout", type=float, metavar="F", help="LSTM dropout (default: %(default)s)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, metavar="N", help="(default: %(default)s)")
    opt.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    opt.add_argument("--save-steps", type=int, metavar="N",
                     help="also checkpoint every N optimizer steps (default: after every epoch only)")
    opt.add_argument("--batch-size", type=int, metavar="N", help="(default: %(default)s)")
    opt.add_argument("--learning-rate", type=float, metavar="F", help="AdamW (default: %(default)s)")
    opt.add_argument("--grad-accum", type=int, metavar="N", help="batches per optimizer step (default: %(default)s)")
    opt.add_argument("--seed", type=int, metavar="N", help="(default: %(default)s)")
    opt.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    opt.add_argument("--device", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    opt.add_argument("--mixed-precision", action="store_true", help="bf16 autocast on CPU, fp16 + loss scaling on CUDA")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    return p


@run_cli
def main(argv: Optional[list] = None) -> int:
    ns = build_parser().parse_args(argv)
    given = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if ns.template is not None and any(a == "--num-virtual-tokens" or a.startswith("--num-virtual-tokens=")
                                       for a in given):
        from ..template import parse

        count = parse(ns.template).num_virtual_tokens
        if ns.num_virtual_tokens != count:
            raise ConfigError(f"--num-virtual-tokens {ns.num_virtual_tokens} contradicts --template, whose slots hold "
                              f"{count}; drop --num-virtual-tokens (the template decides)")
    import transformers

    from ..train import TrainArgs, train  # torch: only once the arguments are known to be usable

    # "Some weights ... newly initialized" is the point of training a head; keep the terminal to our own lines.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        result = train(TrainArgs(**vars(ns)))
    except TrainingDivergedError as exc:
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        transformers.logging.set_verbosity(verbosity)  # main() is also called in-process (tests, other tools)
    if not ns.quiet and os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        last = result.evals[-1] if result.evals else None
        metric = ""
        if last is not None:
            name = "accuracy" if "accuracy" in last else "perplexity"
            metric = f", held-out {name} {last[name]:.4f}"
        print(f"wrote {result.output} (step {result.step}, epoch {result.epoch}{metric})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
