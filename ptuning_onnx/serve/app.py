"""The routes: FastAPI over one loaded model and its batcher. ``create_app(config)`` returns the ASGI app (the gate in
front of FastAPI) and the ``Service`` it shares with the server.

Status codes: 400 a value the model refuses (ids out of range, too long, max_new_tokens over the limit, malformed
JSON); 401 API key; 404 a task this folder was not exported for, or no such path; 413 body too large; 422 wrong
types, missing or unknown fields; 503 loading or draining. Every error is ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PtuningError
from ..runtime.validation import GenerationParams, eos_ids
from . import schemas as s
from .batcher import CLASSIFY, EMBED, GENERATE, TAG, Row
from .gate import Gate
from .metrics import CONTENT_TYPE
from .service import ApiError, ServeConfig, Service, error_body

GENERATIVE = ("causal-lm", "seq2seq-lm")
TASK_OF = {CLASSIFY: ("seq-cls",), TAG: ("token-cls",), EMBED: ("feature-extraction",), GENERATE: GENERATIVE}


def create_app(config: ServeConfig) -> tuple[Any, Service]:
    svc = Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.start_loading()
        yield
        svc.close()

    app = FastAPI(title="ptuning-serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(PtuningError)  # the runtime's InputError and friends: the message names the value
    async def _input_error(request: Request, exc: PtuningError):
        return JSONResponse(error_body(400, " ".join(str(exc).split())), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body(400, "the body is not valid JSON"), status_code=400)
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                 for e in errors[:5]]
        return JSONResponse(error_body(422, "; ".join(parts)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)  # a bug: JSON and one line in the log, never a traceback to the client
    async def _bug(request: Request, exc: Exception):
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if svc.model is None:
            status = "failed" if svc.fatal else "loading"
            return JSONResponse({"status": status, "golden": svc.golden}, status_code=503)
        return {"status": "ready", "golden": svc.golden}

    @app.get("/metrics")
    async def metrics():
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/model")
    async def model_info():
        m = svc.ready_model()
        labels = None if _adapter_labels(m) else getattr(m, "id2label", None)  # multi-prompt: per adapter
        return {"task": m.task, "labels": [labels[k] for k in sorted(labels)] if labels else None,
                "num_virtual_tokens": m.num_virtual_tokens, "dtype": m.manifest.get("dtype", "fp32"),
                "providers": m.providers, "device": m.device, "vocab_size": m.vocab_size,
                "max_user_tokens": m.max_user_tokens, "golden": svc.golden, "folder": str(m.path),
                "adapters": m.adapters, "adapter_labels": _adapter_labels(m),
                "max_batch_size": config.max_batch_size, "max_new_tokens_limit": config.max_new_tokens_limit}

    @app.get("/v1/models")  # openai's client.models.list()
    async def models():
        m = svc.ready_model()
        names = list(m.adapters) if m.adapters else [_name(svc)]  # a multi-prompt folder: one model per adapter
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "ptuning-onnx"} for n in names]}

    @app.post("/v1/generate")
    async def generate(req: s.GenerateRequest):
        model = _model_for(svc, GENERATE)
        _new_tokens(svc, req.max_new_tokens, "max_new_tokens")
        params = GenerationParams(max_new_tokens=req.max_new_tokens, do_sample=req.do_sample,
                                  temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                  repetition_penalty=req.repetition_penalty, seed=req.seed,
                                  eos_token_ids=eos_ids(req.eos_token_id, model.eos_token_id, model.vocab_size))
        rows = _rows(svc, GENERATE, req.prompts, req.input_ids, params=params, stop=_stops(req.stop),
                     stream=req.stream, adapter=req.adapter)
        if req.stream:
            return _sse(svc, rows, _generate_event)
        results = await _collect(svc, rows)
        return {"outputs": results}

    @app.post("/v1/completions")
    async def completions(req: s.CompletionRequest):
        model = _model_for(svc, GENERATE)
        for name, bad in (("n", req.n not in (None, 1)), ("logprobs", req.logprobs is not None),
                          ("echo", bool(req.echo)), ("suffix", req.suffix is not None)):
            if bad:
                raise ApiError(400, f"{name} is not supported by this server")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        _new_tokens(svc, max_tokens, "max_tokens")
        temperature = 1.0 if req.temperature is None else req.temperature
        if temperature < 0:
            raise ApiError(400, f"temperature must be >= 0, got {temperature}")
        sample = temperature > 0  # OpenAI's 0 is greedy
        params = GenerationParams(max_new_tokens=max_tokens, do_sample=sample, temperature=temperature or 1.0,
                                  top_p=req.top_p, seed=req.seed, eos_token_ids=eos_ids(None, model.eos_token_id,
                                                                                        model.vocab_size))
        texts, ids = _openai_input(req.prompt)
        rows = _rows(svc, GENERATE, texts, ids, params=params, stop=_stops(req.stop), stream=req.stream,
                     adapter=_openai_adapter(model, req.model))
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model or _name(svc)}
        if req.stream:
            return _sse(svc, rows, lambda ev: _completion_chunk(meta, ev))
        results = await _collect(svc, rows)
        prompt_tokens = sum(len(r.ids) for r in rows)
        completion_tokens = sum(len(r["token_ids"]) for r in results)
        return {**meta, "choices": [{"text": r["text"] or "", "index": i, "logprobs": None,
                                     "finish_reason": r["finish_reason"]} for i, r in enumerate(results)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.post("/v1/classify")
    async def classify(req: s.ClassifyRequest):
        _model_for(svc, CLASSIFY)
        return {"results": await _collect(svc, _rows(svc, CLASSIFY, req.texts, req.input_ids, adapter=req.adapter))}

    @app.post("/v1/tag")
    async def tag(req: s.TagRequest):
        _model_for(svc, TAG)
        return {"results": await _collect(svc, _rows(svc, TAG, req.texts, None, adapter=req.adapter))}

    @app.post("/v1/embed")
    async def embed(req: s.EmbedRequest):
        _model_for(svc, EMBED)
        rows = _rows(svc, EMBED, req.texts, req.input_ids, options=(req.pooling, req.normalize), adapter=req.adapter)
        return {"embeddings": [v.tolist() for v in await _collect(svc, rows)]}

    @app.post("/v1/embeddings")
    async def embeddings(req: s.EmbeddingsRequest):
        model = _model_for(svc, EMBED)
        texts, ids = _openai_input(req.input)
        rows = _rows(svc, EMBED, texts, ids, options=("mean", True), adapter=_openai_adapter(model, req.model))
        vectors = await _collect(svc, rows)
        if req.dimensions is not None and req.dimensions != len(vectors[0]):
            raise ApiError(400, f"dimensions must be {len(vectors[0])} (this model's), got {req.dimensions}")
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(np.asarray(v, "<f4").tobytes()).decode()
                 if req.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vectors)]
        tokens = sum(len(r.ids) for r in rows)
        return {"object": "list", "data": data, "model": req.model or _name(svc),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return Gate(app, svc), svc


# ---------------------------------------------------------------------- helpers
def _name(svc: Service) -> str:
    return svc.config.folder.resolve().name


def _model_for(svc: Service, kind: str):
    model = svc.ready_model()
    if model.task not in TASK_OF[kind]:
        raise ApiError(404, f"this server's model is a {model.task} export; {kind} needs a "
                            f"{' or '.join(TASK_OF[kind])} export")
    return model


def _adapter_labels(model) -> Optional[dict]:
    """A multi-prompt classifier's labels per adapter, ``{name: [label, ...]}``; None otherwise."""
    per_id = getattr(model, "adapter_labels", None)
    if not per_id or not model.adapters:
        return None
    return {name: [per_id[i][k] for k in sorted(per_id[i])] for name, i in model.adapters.items()}


def _openai_adapter(model, name: Optional[str]) -> Optional[str]:
    """OpenAI's ``model`` field: the adapter of a multi-prompt folder (required there); ignored otherwise."""
    if not model.adapters:
        return None
    if name is None:
        raise ApiError(400, f"this server holds {len(model.adapters)} prompts: set model to one of "
                            f"{', '.join(model.adapters)}")
    return name


def _new_tokens(svc: Service, value: int, name: str) -> None:
    limit = svc.config.max_new_tokens_limit
    if value > limit:
        raise ApiError(400, f"{name} {value} exceeds this server's limit of {limit} (--max-new-tokens-limit)")


def _stops(stop) -> tuple:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > 4 or any(not x for x in stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings")
    return stops


def _openai_input(value) -> tuple:
    """OpenAI's prompt/input forms -> (texts, None) or (None, id rows)."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return value, None
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return None, [value]
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return None, value
    raise ApiError(400, "the input must be a string, a list of strings, a list of token ids or a list of such lists")


def _rows(svc: Service, kind: str, texts, input_ids, *, params=None, stop: tuple = (), stream: bool = False,
          options: tuple = (), adapter: Optional[str] = None) -> list:
    """Validate each prompt ALONE, as the runtime would, and make it a row; ``ApiError``/``InputError`` -> 400.

    ``adapter``: a multi-prompt folder's prompt for every row (required there; refused by a single-prompt folder)."""
    model = svc.ready_model()
    model.prompt_ids(adapter, None, 1)  # the runtime's own check: unknown names listed, a missing one refused
    if stop and model.tokenizer is None:
        raise ApiError(400, "stop strings need the folder's tokenizer, and this folder has none; stop with "
                            "eos_token_id instead")
    if (texts is None) == (input_ids is None):
        raise ApiError(400, "pass either texts (prompts) or input_ids, not both and not neither")
    items = [texts] if isinstance(texts, (str, dict)) else texts if texts is not None else input_ids
    if not items:
        raise ApiError(400, "no inputs given (an empty list)")
    new = params.max_new_tokens if params is not None else 0
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()  # the request's: every row reports here
    rows = []
    for index, item in enumerate(items):
        # The runtime's own checks (ids in range, lengths with the virtual tokens counted, padding rules).
        if texts is not None:
            ids, _, _, _ = model._batch([item], None, None, new)
        else:
            ids, _, _, _ = model._batch(None, [item], None, new)
        rows.append(Row(kind, index, loop, events, ids=ids[0], text=item if kind == TAG else None, params=params,
                        stop=stop, stream=stream, options=options, adapter=adapter))
    return rows


async def _collect(svc: Service, rows: list) -> list:
    assert svc.batcher is not None  # _rows went through ready_model()
    events: asyncio.Queue = rows[0].events
    results: list = [None] * len(rows)
    remaining = len(rows)
    svc.batcher.submit(rows)
    try:
        while remaining:
            kind, index, value = (await events.get())[:3]
            if kind == "error":
                raise value
            if kind == "done":
                results[index], remaining = value, remaining - 1
    finally:
        for row in rows:  # an error, or the request's task cancelled: nothing more is run for it
            row.cancel()
    return results


def _sse(svc: Service, rows: list, event_json) -> StreamingResponse:
    """Server-sent events: ``data: <json>`` per token and per finished row, then ``data: [DONE]``."""

    async def events() -> AsyncIterator[str]:
        assert svc.batcher is not None
        queue: asyncio.Queue = rows[0].events
        remaining = len(rows)
        svc.batcher.submit(rows)
        try:
            while remaining:
                event = await queue.get()
                if event[0] == "error":
                    exc = event[2]
                    yield _data(error_body(500, f"internal error: {type(exc).__name__}: {exc}"))
                    return
                if event[0] == "done":
                    remaining -= 1
                payload = event_json(event)
                if payload is not None:
                    yield _data(payload)
            yield "data: [DONE]\n\n"
        finally:  # also on the client's disconnect (the response cancels this generator): free the rows' slots
            for row in rows:
                row.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _generate_event(event: tuple) -> Optional[dict]:
    kind, index, value = event[:3]
    if kind == "token":
        return {"index": index, "token_id": value, "text": event[3]}
    return {"index": index, **value}  # done: text, token_ids, finish_reason


def _completion_chunk(meta: dict, event: tuple) -> Optional[dict]:
    kind, index = event[:2]
    if kind == "token":
        if not event[3]:
            return None
        choice = {"text": event[3], "index": index, "logprobs": None, "finish_reason": None}
    else:
        choice = {"text": "", "index": index, "logprobs": None, "finish_reason": event[2]["finish_reason"]}
    return {**meta, "choices": [choice]}
