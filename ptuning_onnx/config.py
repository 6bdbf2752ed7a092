"""P-tuning configuration: the same fields, defaults and meaning as ``peft.PromptEncoderConfig``.

This module is torch-free so that the runtime and the CLI can read adapter configs without importing torch.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

from .errors import ConfigError


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


class TaskType(str, enum.Enum):
    """PEFT's task names. The CLI spells them ``causal-lm``, ``seq-cls`` and so on (see ``CLI_TASKS``)."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


CLI_TASKS = {
    "causal-lm": TaskType.CAUSAL_LM,
    "seq-cls": TaskType.SEQ_CLS,
    "token-cls": TaskType.TOKEN_CLS,
    "seq2seq-lm": TaskType.SEQ_2_SEQ_LM,
    "feature-extraction": TaskType.FEATURE_EXTRACTION,
}
TASK_TO_CLI = {v: k for k, v in CLI_TASKS.items()}


def parse_task(value: Union[str, TaskType, None]) -> TaskType:
    """Accept ``TaskType``, PEFT's spelling (``SEQ_CLS``) or the CLI's (``seq-cls``)."""
    if isinstance(value, TaskType):
        return value
    if isinstance(value, str):
        if value in CLI_TASKS:
            return CLI_TASKS[value]
        try:
            return TaskType(value.upper())
        except ValueError:
            pass
    allowed = ", ".join(CLI_TASKS)
    raise ConfigError(f"unknown task {value!r}; expected one of: {allowed}")


def _encoder_type(value: Union[str, PromptEncoderReparameterizationType]) -> PromptEncoderReparameterizationType:
    if isinstance(value, PromptEncoderReparameterizationType):
        return value
    if isinstance(value, str):
        try:
            return PromptEncoderReparameterizationType(value.upper())
        except ValueError:
            pass
    raise ConfigError(f"unknown encoder_reparameterization_type {value!r}; expected one of: MLP, LSTM")


@dataclass
class PromptEncoderConfig:
    """Configuration of a P-tuning prompt encoder, field for field ``peft.PromptEncoderConfig``.

    ``token_dim``, ``num_attention_heads`` and ``num_layers`` may be left ``None`` and filled from the base
    model's config with :meth:`fill_from_model_config`. ``encoder_hidden_size=None`` means ``token_dim``.
    """

    num_virtual_tokens: Optional[int] = field(default=None, metadata={"help": "Number of virtual tokens"})
    token_dim: Optional[int] = field(default=None, metadata={"help": "Hidden size of the base model's embeddings"})
    num_transformer_submodules: Optional[int] = field(
        default=None, metadata={"help": "2 for encoder-decoder models (the table has 2n rows), else 1"}
    )
    num_attention_heads: Optional[int] = field(default=None, metadata={"help": "Attention heads of the base"})
    num_layers: Optional[int] = field(default=None, metadata={"help": "Transformer layers of the base"})
    encoder_reparameterization_type: Union[str, PromptEncoderReparameterizationType] = field(
        default=PromptEncoderReparameterizationType.MLP, metadata={"help": "MLP or LSTM"}
    )
    encoder_hidden_size: Optional[int] = field(default=None, metadata={"help": "Hidden size of the encoder"})
    encoder_num_layers: int = field(
        default=2, metadata={"help": "LSTM layers; the MLP always has exactly 2 hidden layers, as in PEFT"}
    )
    encoder_dropout: float = field(default=0.0, metadata={"help": "LSTM dropout; ignored by the MLP, as in PEFT"})
    task_type: Optional[Union[str, TaskType]] = field(default=None, metadata={"help": "PEFT task type"})
    inference_mode: bool = field(default=False, metadata={"help": "Only the baked table exists"})
    base_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Name or path of the base"})
    revision: Optional[str] = field(default=None, metadata={"help": "Revision of the base model"})
    modules_to_save: Optional[list] = field(
        default=None, metadata={"help": "Base modules trained and saved beside the prompt (e.g. a classifier)"}
    )
    peft_type: str = field(default="P_TUNING", metadata={"help": "Always P_TUNING"})

    def __post_init__(self) -> None:
        self.encoder_reparameterization_type = _encoder_type(self.encoder_reparameterization_type)
        if self.task_type is not None:
            self.task_type = parse_task(self.task_type)
        if self.peft_type != "P_TUNING":
            raise ConfigError(f"peft_type is {self.peft_type!r}; only P_TUNING adapters are supported")
        if self.num_virtual_tokens is None:
            raise ConfigError("num_virtual_tokens is required")
        for name in ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "encoder_hidden_size",
                     "num_attention_heads", "num_layers", "encoder_num_layers"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        dropout = self.encoder_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {dropout!r}")
        self.encoder_dropout = float(dropout)

    # PEFT fills these from the base model in `_prepare_prompt_learning_config`; we do the same.
    def fill_from_model_config(self, model_config: Any) -> "PromptEncoderConfig":
        """Fill ``token_dim`` and friends from a transformers config, and check they agree with it."""
        cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
        token_dim = _first(cfg, "hidden_size", "n_embd", "d_model", "dim")
        if self.token_dim is None:
            self.token_dim = token_dim
        elif token_dim is not None and self.token_dim != token_dim:
            raise ConfigError(
                f"adapter token_dim is {self.token_dim} but the base model's hidden size is {token_dim}"
            )
        if self.num_layers is None:
            self.num_layers = _first(cfg, "num_hidden_layers", "num_layers", "n_layer", "n_layers")
        if self.num_attention_heads is None:
            self.num_attention_heads = _first(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
        if self.num_transformer_submodules is None:
            seq2seq = self.task_type == TaskType.SEQ_2_SEQ_LM or cfg.get("is_encoder_decoder", False)
            self.num_transformer_submodules = 2 if seq2seq else 1
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim
        self.__post_init__()
        return self

    @property
    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    def require_complete(self) -> None:
        if self.token_dim is None:
            raise ConfigError("token_dim is unknown; call fill_from_model_config(base_config) first")

    def to_dict(self) -> dict:
        """JSON-ready dict in PEFT's ``adapter_config.json`` layout."""
        out = asdict(self)
        out["encoder_reparameterization_type"] = self.encoder_reparameterization_type.value
        out["task_type"] = self.task_type.value if self.task_type is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "PromptEncoderConfig":
        """Build from an ``adapter_config.json`` dict. Keys PEFT adds that we do not model are ignored."""
        if not isinstance(data, dict):
            raise ConfigError(f"adapter config must be a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "P_TUNING")
        if peft_type != "P_TUNING":
            raise ConfigError(f"adapter peft_type is {peft_type!r}; only P_TUNING adapters are supported")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if isinstance(kwargs.get("modules_to_save"), list):
            kwargs["modules_to_save"] = list(dict.fromkeys(kwargs["modules_to_save"]))
        return cls(**kwargs)


def _first(cfg: dict, *keys: str) -> Optional[int]:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return None
