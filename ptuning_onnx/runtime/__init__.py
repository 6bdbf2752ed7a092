"""Torch-free inference on an exported folder: numpy, onnxruntime and tokenizers, nothing more.

    from ptuning_onnx import runtime
    model = runtime.load("exported/")            # verifies sha256, picks CUDA when it works
    model.generate("Hello", max_new_tokens=20)   # causal-lm / seq2seq-lm; also stream(...)
    model.classify(["a", "b"])                   # seq-cls;  tag(texts) for token-cls; embed(texts) for feature-extraction
    runtime.verify_golden("exported/")           # golden.npz through this runtime, on this host's provider
"""

from .encoders import FeatureExtractor, SequenceClassifier, TokenClassifier
from .loader import load
from .model import CausalLM, RuntimeModel, Seq2SeqLM
from .generation import NaNLogitsError
from .golden import GoldenMismatchError, NoGoldenError, verify_golden
from .session import ProviderError, SessionLoadError, cuda_available
from .validation import (AttentionMaskError, EmptyInputError, GenerationConfigError, InputDtypeError, InputError,
                         SequenceLengthError, TokenIdError)
from .tokenizer import NoTokenizerError

__all__ = [
    "load", "RuntimeModel", "CausalLM", "Seq2SeqLM", "SequenceClassifier", "TokenClassifier", "FeatureExtractor",
    "InputError", "InputDtypeError", "TokenIdError", "EmptyInputError", "AttentionMaskError", "SequenceLengthError",
    "GenerationConfigError", "NoTokenizerError", "ProviderError", "SessionLoadError", "cuda_available",
    "verify_golden", "GoldenMismatchError", "NoGoldenError", "NaNLogitsError",
]
