#!/usr/bin/env python
"""Build the offline tiny reference model zoo used by ptuning_onnx tests and examples.

Usage::

    python tools/build_models.py [--out models]

Creates ``<out>/{gpt2,llama,bert,t5}``, each holding ``config.json``,
``model.safetensors`` and a fast tokenizer (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``) trained on
``tools/corpus.txt``. No network access is needed. The output is deterministic:
running the script twice produces byte-identical files (weights come from
``torch.manual_seed(0)`` + the standard config initialisation, tokenizers are
trained single-threaded on a fixed corpus).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

# Must be set before tokenizers / transformers are imported: single-threaded,
# reproducible tokenizer training, and never touch the network.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import (  # noqa: E402
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging as hf_logging  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CORPUS = HERE / "corpus.txt"

VOCAB_SIZE = 1000
HIDDEN = 64
LAYERS = 2
HEADS = 4
INTERMEDIATE = 128
MAX_POSITIONS = 128
MODEL_NAMES = ("gpt2", "llama", "bert", "t5")


def read_corpus() -> list[str]:
    with open(CORPUS, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _train(tok: Tokenizer, trainer, lines: list[str]) -> Tokenizer:
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return tok


def _save_model(model, out: Path) -> None:
    model.eval()
    model.save_pretrained(out, safe_serialization=True)


def _save_tokenizer(tok: Tokenizer, out: Path, **kwargs) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_POSITIONS, **kwargs)
    fast.save_pretrained(out)
    return fast


def _learn_wordpiece_vocab(
    lines: list[str], normalizer, pre_tokenizer, specials: list[str], vocab_size: int
) -> dict[str, int]:
    """Deterministic WordPiece vocabulary learner (BPE merges with a ``##`` prefix).

    Equivalent in spirit to ``tokenizers.trainers.WordPieceTrainer`` but
    reproducible: that trainer numbers the ``##`` alphabet in hash-map order,
    which changes merge tie-breaks and therefore the learned vocab run to run.
    Here ties are broken by (count desc, pair) and ids are assigned in learning
    order: specials, word-initial characters, ``##`` characters, then merges.
    """
    from collections import Counter

    words: Counter[str] = Counter()
    for line in lines:
        text = normalizer.normalize_str(line)
        for word, _ in pre_tokenizer.pre_tokenize_str(text):
            words[word] += 1
    seqs = {w: [w[0]] + ["##" + c for c in w[1:]] for w in words}
    initial = sorted({w[0] for w in words})
    cont = sorted({p for s in seqs.values() for p in s[1:]})
    vocab: list[str] = list(specials) + initial + cont
    known = set(vocab)

    def word_pairs(seq: list[str]) -> Counter[tuple[str, str]]:
        return Counter(zip(seq, seq[1:], strict=False))

    pairs: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[str]] = {}
    for w, seq in seqs.items():
        for pair, k in word_pairs(seq).items():
            pairs[pair] += k * words[w]
            where.setdefault(pair, set()).add(w)
    while len(vocab) < vocab_size:
        live = [(pair, n) for pair, n in pairs.items() if n > 0]
        if not live:
            break
        (left, right), _ = min(live, key=lambda kv: (-kv[1], kv[0]))
        merged = left + right[2:]
        for w in sorted(where.pop((left, right), ())):
            seq, n = seqs[w], words[w]
            for pair, k in word_pairs(seq).items():
                pairs[pair] -= k * n
            i, out = 0, []
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == left and seq[i + 1] == right:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
            for pair, k in word_pairs(out).items():
                pairs[pair] += k * n
                where.setdefault(pair, set()).add(w)
        pairs.pop((left, right), None)
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
    return {t: i for i, t in enumerate(vocab)}


def _byte_level_bpe(lines: list[str], special_tokens: list[str], unk_token: str | None = None) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``lines`` (GPT-2 and Llama style; this trainer is deterministic)."""
    tok = Tokenizer(models.BPE(unk_token=unk_token) if unk_token else models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    _train(tok, trainer, lines)
    return tok


# --------------------------------------------------------------------------- gpt2
def build_gpt2(out: Path, lines: list[str]) -> None:
    eot, pad = "<|endoftext|>", "<pad>"
    tok = _byte_level_bpe(lines, [eot, pad])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = _save_tokenizer(
        tok,
        out,
        bos_token=eot,
        eos_token=eot,
        unk_token=eot,
        pad_token=pad,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    cfg = GPT2Config(
        vocab_size=len(fast),
        n_positions=MAX_POSITIONS,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=INTERMEDIATE,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    _save_model(GPT2LMHeadModel(cfg), out)


# -------------------------------------------------------------------------- llama
def build_llama(out: Path, lines: list[str]) -> None:
    unk, bos, eos, pad = "<unk>", "<s>", "</s>", "<pad>"
    tok = _byte_level_bpe(lines, [unk, bos, eos, pad], unk_token=unk)
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, bos_id)],
            ),
        ]
    )
    fast = _save_tokenizer(
        tok,
        out,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    _save_model(LlamaForCausalLM(cfg), out)


# --------------------------------------------------------------------------- bert
def build_bert(out: Path, lines: list[str]) -> None:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = _learn_wordpiece_vocab(lines, normalizer, pre_tokenizer, specials, VOCAB_SIZE)
    tok = Tokenizer(
        models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100)
    )
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(specials)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = _save_tokenizer(
        tok,
        out,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side="right",
        do_lower_case=True,
        clean_up_tokenization_spaces=True,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    cfg = BertConfig(
        vocab_size=len(fast),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POSITIONS,
        type_vocab_size=2,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    # BertModel (with pooler) so that BertForSequenceClassification only has to
    # initialise the classifier head; BertForTokenClassification simply ignores
    # the pooler weights.
    _save_model(BertModel(cfg, add_pooling_layer=True), out)


# ----------------------------------------------------------------------------- t5
def build_t5(out: Path, lines: list[str]) -> None:
    pad, eos, unk = "<pad>", "</s>", "<unk>"
    # A SentencePiece-style (Metaspace) BPE. The tokenizers Unigram trainer is not
    # reproducible run to run (scores of "required characters" depend on hash-map
    # iteration order), so BPE is used to keep the build byte-identical.
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[pad, eos, unk],
        show_progress=False,
    )
    _train(tok, trainer, lines)
    assert (tok.token_to_id(pad), tok.token_to_id(eos), tok.token_to_id(unk)) == (0, 1, 2)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0",
        pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
        special_tokens=[(eos, 1)],
    )
    fast = _save_tokenizer(
        tok,
        out,
        pad_token=pad,
        eos_token=eos,
        unk_token=unk,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )
    cfg = T5Config(
        vocab_size=len(fast),
        d_model=HIDDEN,
        d_kv=HIDDEN // HEADS,
        d_ff=INTERMEDIATE,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        num_heads=HEADS,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    _save_model(T5ForConditionalGeneration(cfg), out)


BUILDERS = {"gpt2": build_gpt2, "llama": build_llama, "bert": build_bert, "t5": build_t5}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "models"), help="output directory (default: <repo>/models)")
    parser.add_argument("--only", nargs="*", choices=MODEL_NAMES, help="build only these models")
    args = parser.parse_args(argv)

    hf_logging.set_verbosity_error()
    lines = read_corpus()
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    for name in args.only or MODEL_NAMES:
        out = out_root / name
        if out.exists():
            shutil.rmtree(out)  # no stale files (e.g. an old pytorch_model.bin)
        out.mkdir(parents=True)
        BUILDERS[name](out, lines)
        for p in out.iterdir():
            p.chmod(0o644)  # safetensors writes 0600; keep modes uniform
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"{name:6s} -> {out}  ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
