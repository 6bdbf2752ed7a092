"""``ptuning-serve``: an HTTP service over the torch-free runtime (the ``serve`` extra: fastapi, uvicorn,
prometheus-client). Imports neither torch nor transformers.

    batcher.py  dynamic batching: rows of concurrent requests, each with its own decoding state
    continuous.py  causal LMs on CPU: rows join and leave a decoding batch between steps
    service.py  settings (ServeConfig), the model loaded on a thread, errors
    gate.py     drain (503), body limit (413), API key (401), metrics, in front of the routes
    app.py      the FastAPI routes: /healthz /readyz /metrics /v1/model /v1/generate /v1/completions
                /v1/classify /v1/tag /v1/embed /v1/embeddings
    server.py   uvicorn with a SIGTERM drain; ``serve(config, host, port)``
    metrics.py  the Prometheus registry
"""

from .app import create_app
from .server import serve
from .service import ServeConfig

__all__ = ["create_app", "serve", "ServeConfig"]
