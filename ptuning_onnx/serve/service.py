"""The service's state: its settings, the model (loaded on a thread, so /healthz answers while it loads), the batcher,
the drain flag, and the errors every endpoint answers with.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import manifest as mf
from ..errors import ConfigError, PtuningError
from ..runtime import GoldenMismatchError, load
from ..runtime.model import RuntimeModel
from .batcher import Batcher
from .metrics import Metrics

log = logging.getLogger("ptuning_onnx.serve")

PROVIDERS = ("auto", "cpu", "cuda")
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: ~100k tokens of ids as JSON, far beyond any tiny model's positions


class ApiError(Exception):
    """An answer with a status and a one-line message: ``{"error": {"message", "type", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "request_too_large", 422: "invalid_request_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message

    def body(self) -> dict:
        return error_body(self.status, self.message)


def error_body(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": ApiError.TYPES.get(status, "internal_error"), "code": status}}


@dataclass
class ServeConfig:
    """What ``ptuning-serve`` takes; checked here so that the CLI and ``create_app`` refuse the same values."""

    folder: Path
    provider: str = "auto"
    threads: Optional[int] = None
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_new_tokens_limit: int = 512
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    api_key: Optional[str] = None

    def __post_init__(self):
        self.folder = Path(self.folder)
        if self.provider not in PROVIDERS and not str(self.provider).startswith("cuda:"):
            raise ConfigError(f"provider must be one of {', '.join(PROVIDERS)} (or cuda:N), got {self.provider!r}")
        for name, low in (("max_batch_size", 1), ("max_new_tokens_limit", 1), ("max_body_bytes", 64)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads must be an integer >= 1, got {self.threads!r}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"max-wait-ms must be in [0, 10000], got {self.max_wait_ms!r}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("the API key is empty")


class Service:
    """Shared by every request. ``model`` and ``batcher`` are None until loaded; ``fatal`` holds (exit code,
    message) when loading failed, and the server then exits."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = Metrics()
        self.model: Optional[RuntimeModel] = None
        self.batcher: Optional[Batcher] = None
        self.golden = "pending"  # "passed" | "absent" (the folder has no golden.npz)
        self.fatal: Optional[tuple] = None
        self.draining = False
        self.inflight = 0  # requests being answered (probes and /metrics excluded); the drain waits for 0

    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self._load, name="ptuning-serve-load", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        cfg = self.config
        try:
            manifest = mf.read_manifest(cfg.folder, verify=False)
            has_golden = mf.GOLDEN_NAME in (manifest.get("files") or {})
            model = load(cfg.folder, provider=cfg.provider, threads=cfg.threads,
                         verify="golden" if has_golden else True)
            self.golden = "passed" if has_golden else "absent"
            m = self.metrics
            self.batcher = Batcher(model, max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
                                   on_batch=lambda kind, size: m.batch_size.labels(kind).observe(size),
                                   on_tokens=m.tokens.inc, on_queue=m.queue_depth.set)
            self.model = model
            log.info("ptuning-serve: %s loaded (%s, golden %s)", cfg.folder, model.task, self.golden)
        except GoldenMismatchError as exc:
            self.fatal = (1, f"golden self-check failed: {' '.join(str(exc).split())}")
        except (PtuningError, OSError) as exc:
            self.fatal = (2, " ".join(str(exc).split()))
        except Exception as exc:  # a bug or a dependency failing: still one line, and the server exits
            self.fatal = (3, f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}")

    def ready_model(self) -> RuntimeModel:
        if self.model is None or self.batcher is None:
            raise ApiError(503, "the model is still loading" if self.fatal is None else "the model failed to load")
        return self.model

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close(timeout=30)
