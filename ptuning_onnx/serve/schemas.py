"""Request bodies. Types are strict (``"5"`` is not 5; a wrong type is a 422); ranges and the model's own limits are
checked afterwards by the runtime's validation (a 400 that names the value).

Our endpoints refuse unknown fields, so a typo is an error rather than a silently ignored option. The OpenAI-shaped
ones ignore fields they do not use, as clients send extra ones (``user``), and refuse the ones that would change
the answer (``n`` > 1, ``logprobs``, ``echo``, ``suffix``). Their ``model`` names the adapter of a multi-prompt
folder (as OpenAI-compatible servers name LoRA adapters); a single-prompt folder ignores it.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

Texts = Union[str, list[str]]
# Rows of a templated folder's fields ({"premise": ..., "hypothesis": ...}), or plain texts (docs/FORMAT.md).
Fields = dict[str, str]
Inputs = Union[str, Fields, list[Union[str, Fields]]]
Ids = list[list[int]]


class _Ours(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _OpenAI(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class GenerateRequest(_Ours):
    prompts: Optional[Inputs] = None
    adapter: Optional[str] = None  # a multi-prompt folder's prompt for every row of the request
    input_ids: Optional[Ids] = None
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    eos_token_id: Optional[Union[int, list[int]]] = None  # None: the model's; []: never stop early
    stop: Optional[Texts] = None
    stream: bool = False


class ClassifyRequest(_Ours):
    texts: Optional[Inputs] = None
    adapter: Optional[str] = None
    input_ids: Optional[Ids] = None


class TagRequest(_Ours):
    texts: Texts
    adapter: Optional[str] = None


class EmbedRequest(_Ours):
    texts: Optional[Inputs] = None
    adapter: Optional[str] = None
    input_ids: Optional[Ids] = None
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = False


class CompletionRequest(_OpenAI):
    """OpenAI's ``/v1/completions``. ``temperature`` 0 is greedy; the default (1) samples, as OpenAI's does."""

    model: Optional[str] = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Texts] = None
    stream: bool = False
    n: Optional[int] = None
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    suffix: Optional[str] = None


class EmbeddingsRequest(_OpenAI):
    """OpenAI's ``/v1/embeddings``: mean-pooled, L2-normalised vectors (as OpenAI's are); ``encoding_format``
    ``base64`` is little-endian float32, which the ``openai`` client asks for by default."""

    model: Optional[str] = None
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
