"""``capibara serve``: its options and the command (registered by ``capibara.cli``).

The model, tokenizer and engine are built by ``capibara.cli``'s own helpers, so
``serve`` serves exactly what ``generate`` would (a checkpoint, or the CLI's default
model) with the same engine options; this module adds the HTTP side.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
import sys

# Names the fault hook (docs/serving.md, "Fault injection"): a test-only switch.
FAULT_ENV = "CAPIBARA_SERVE_FAULT_PROMPT"


def add_serve(command, common) -> None:
    """Adds the ``serve`` subcommand; ``command(name, description)`` makes a subparser
    and ``common(parser)`` adds the model/engine options every command shares."""
    p = command("serve", "serve an OpenAI-compatible HTTP API (completions, chat, metrics)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (keep it local "
        "and put a reverse proxy in front to serve a network: docs/serving.md)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port to bind")
    p.add_argument(
        "--api-key",
        default=os.environ.get("CAPIBARA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $CAPIBARA_API_KEY, else none)",
    )
    p.add_argument(
        "--served-model-name",
        help="the model id clients send (default: the checkpoint's file or directory "
        "name, else capibara-PRESET for a random-weight model)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=512,
        help="prompt + generated tokens of one request (rounded up to whole pages)",
    )
    p.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="start serving before compiling every step shape (the first requests then "
        "pay for the compilations) (default: warm up)",
    )
    p.add_argument("--log-level", default="warning", help="uvicorn's log level")
    common(p)
    p.set_defaults(run=serve)


def add_bench_url(bench) -> None:
    """``bench-serve``'s options for an HTTP server (``capibara/server/bench.py``)."""
    bench.add_argument(
        "--url",
        help="benchmark a running OpenAI-compatible server at this URL (e.g. "
        "http://127.0.0.1:8000) instead of an in-process engine (default: in-process)",
    )
    bench.add_argument(
        "--concurrency",
        type=int,
        help="with --url: streams at once at most (default: --requests, all at once)",
    )
    bench.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="with --url: Poisson arrivals per second; inf: all at once",
    )
    bench.add_argument(
        "--model", help="with --url: the model id to request (default: the server's first)"
    )
    bench.add_argument(
        "--api-key",
        default=os.environ.get("CAPIBARA_API_KEY"),
        help="with --url: the server's API key (default: $CAPIBARA_API_KEY, else none)",
    )


def http_bench(args) -> int:
    from capibara.server.bench import http_bench as run

    return run(args)


def model_name(args) -> str:
    """The id clients send: ``--served-model-name``, else the checkpoint's file or
    directory name (``.gguf`` dropped), else ``capibara-PRESET`` for a random model."""
    if args.served_model_name:
        return args.served_model_name
    # A CLI without --random-tiny serves a random model when no checkpoint is given.
    random_model = getattr(args, "random_tiny", not args.checkpoint)
    if random_model:
        return f"capibara-{args.preset}"
    if args.checkpoint:
        path = pathlib.Path(args.checkpoint).resolve()
    else:  # the CLI's default model
        from capibara.core.pretrained import DEFAULT_FILE

        path = pathlib.Path(DEFAULT_FILE)
    return path.name.removesuffix(".gguf")


def fault_hook(tokenizer, marker: str):
    """Test-only: fails, in the engine thread, every request whose prompt text contains
    ``marker`` -- at its first token, or at its ``N``-th where the prompt says
    ``marker:N`` (a failure in the middle of a stream). The others are served as usual.
    """
    pattern = re.compile(re.escape(marker) + r"(?::(\d+))?")

    @functools.lru_cache(maxsize=1024)  # the hook runs at every token of every request
    def fails_at(prompt: tuple[int, ...]) -> int | None:
        found = pattern.search(tokenizer.decode(list(prompt)))
        return None if found is None else int(found.group(1) or 1)

    def hook(prompt_ids: list[int], n: int) -> None:
        if fails_at(tuple(prompt_ids)) == n:
            raise RuntimeError(f"fault injected by {FAULT_ENV} at token {n}")

    return hook


def serve(args) -> int:
    import uvicorn

    from capibara import cli
    from capibara.core.inference.warmup import warm_up
    from capibara.server.app import create_app

    engine = cli._engine(args, args.max_seq_len)
    marker = os.environ.get(FAULT_ENV)
    if marker:
        engine.set_fault_hook(fault_hook(engine.tokenizer, marker))
        print(f"capibara: {FAULT_ENV} is set: prompts containing it fail", file=sys.stderr)
    if args.warm_up:
        w = warm_up(engine)
        print(f"warm-up: {w.shapes} step shapes compiled in {w.seconds:.2f}s", file=sys.stderr)
    # The sampling options of the command line are the defaults of requests that omit
    # the field: by default 64 tokens, greedy, as `capibara generate` (create_app
    # without defaults uses OpenAI's: temperature 1, 16 tokens for completions).
    defaults = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    name = model_name(args)
    app = create_app(engine, model_name=name, api_key=args.api_key, defaults=defaults)
    print(f"serving {name} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
        # Behind a reverse proxy, trust its X-Forwarded-* only from the local host.
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
    )
    return 0
