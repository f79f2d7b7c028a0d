"""``capibara serve``: an OpenAI-compatible HTTP API over ``CapibaraInference``.

An ASGI app (FastAPI) run by uvicorn: ``POST /v1/completions``,
``POST /v1/chat/completions`` (streamed as Server-Sent Events or not), ``GET
/v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus, ``prometheus-client``).
See docs/serving.md.

Modules: ``app`` (routes and the life of a request), ``schemas`` (request bodies),
``streaming`` (response and chunk shapes, SSE), ``errors`` (OpenAI's error JSON),
``chat`` (chat template), ``metrics`` (the Prometheus registry), ``cli`` (the
command), ``bench`` (the HTTP load generator of ``bench-serve --url``).

The package imports FastAPI only through ``app``: ``capibara.server.cli`` is imported
by the command-line parser and stays light.
"""


def create_app(*args, **kwargs):
    """``capibara.server.app.create_app`` (imported on first use: FastAPI is heavy)."""
    from capibara.server.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
