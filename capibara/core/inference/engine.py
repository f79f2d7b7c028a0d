"""``CapibaraInference``: the serving engine (batch, async and streaming generation).

One background thread runs the step loop (``Scheduler`` plans, ``ModelRunner``
computes, results go back to each request's sink). Everything the loop and the
callers share (queue, batch, pages, metrics) is guarded by one condition lock; the
device step itself runs outside the lock, so submitting or cancelling never waits
for a step. A request cancelled while its step is in flight is simply skipped when
the step returns (its pages may be reused by a later step only: steps are ordered on
the donated cache buffers).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np

from capibara.core.inference.kv_cache import PagePool
from capibara.core.inference.metrics import EngineMetrics, MetricsSnapshot, prometheus_text
from capibara.core.inference.params import (
    ContextLengthError,
    EngineConfig,
    Generation,
    QueueFullError,
    RequestMetrics,
    SamplingParams,
    StreamEvent,
)
from capibara.core.inference.prefix_cache import PrefixCache
from capibara.core.inference.runner import ModelRunner
from capibara.core.inference.scheduler import FINISHED, RUNNING, Request, Scheduler, pages_for
from capibara.core.inference.tokenizer import ByteTokenizer, IncrementalDecoder

Prompt = str | Sequence[int]


class _SyncSink:
    def __init__(self):
        self.done = threading.Event()
        self.generation: Generation | None = None

    def on_token(self, request, token_id, text):
        pass

    def on_finish(self, request, generation, text):
        self.generation = generation
        self.done.set()


class _AsyncSink:
    """Hands events to an asyncio loop from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.future: asyncio.Future[Generation] = loop.create_future()

    def _finish(self, generation):
        if not self.future.done():
            self.future.set_result(generation)

    def on_token(self, request, token_id, text):
        self.loop.call_soon_threadsafe(
            self.queue.put_nowait, StreamEvent(token_id=token_id, text=text)
        )

    def on_finish(self, request, generation, text):
        self.loop.call_soon_threadsafe(
            self.queue.put_nowait, StreamEvent(token_id=None, text=text, generation=generation)
        )
        self.loop.call_soon_threadsafe(self._finish, generation)


class EventStream:
    """The events of one submitted request (``CapibaraInference.open_stream``).

    An async iterator of ``StreamEvent`` (the last carries the ``Generation``) and an
    async context manager. ``abort()`` (callable from the event loop's thread at any
    moment, e.g. when an HTTP client disconnects) or leaving the ``async with`` frees
    the request's slot and pages at once; the iterator then ends with the
    ``"cancelled"`` generation, unless it had finished already.

    NOTE: a class and not an async generator on purpose: a generator that was never
    started runs no ``finally`` when closed, so a request submitted but never read
    would keep its pages.
    """

    def __init__(self, engine: CapibaraInference, request: Request, sink: _AsyncSink):
        self._engine, self.request, self._sink = engine, request, sink
        self._done = False

    @property
    def request_id(self) -> int:
        return self.request.id

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._sink.queue.get()
        if event.generation is not None:
            self._done = True
        return event

    def abort(self) -> None:
        self._engine._abort(self.request)

    async def aclose(self) -> None:
        self.abort()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.abort()


class CapibaraInference:
    """Serves a ``CapibaraModel`` with a paged KV cache and continuous batching.

    Example:
      engine = CapibaraInference(model, EngineConfig(max_slots=8), tokenizer=None)
      [gen] = engine.generate_batch(["Hello"], SamplingParams(max_tokens=32))
      gen.text, gen.token_ids, gen.finish_reason, gen.metrics.ttft
      async for event in engine.stream("Hello"): print(event.text, end="")
      engine.close()

    Models with Mixture-of-Depths layers or an expert-choice router are refused (their
    routing is not causal, so a KV cache cannot serve them); MoE layers are served
    dropless with ``RoutingContext(decode=True)``.
    """

    def __init__(self, model, config: EngineConfig | None = None, tokenizer=None):
        config = EngineConfig() if config is None else config
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        mc = model.config
        if mc.mod_layers:
            raise ValueError(
                f"model.config.mod_layers={mc.mod_layers}: Mixture-of-Depths layers are not "
                "served (their top-k is not causal, and skipped tokens write no KV entries)"
            )
        if mc.num_experts and mc.router_kind == "expert_choice":
            raise ValueError(
                "model.config.router_kind='expert_choice' is not causal and cannot be served"
            )
        self.config = config
        self.model = model
        # A model from from_pretrained carries its checkpoint's tokenizer (model.tokenizer).
        if tokenizer is None:
            tokenizer = getattr(model, "tokenizer", None) or ByteTokenizer()
        self.tokenizer = tokenizer
        self._pool = PagePool(config.num_pages)
        self._prefix = PrefixCache(self._pool, config.page_size) if config.prefix_cache else None
        self._scheduler = Scheduler(config, self._pool, self._prefix)
        self._runner = ModelRunner(model, config)
        self._metrics = EngineMetrics()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopping = False
        self._ids = itertools.count()
        self._seeds = np.random.default_rng(config.seed)
        self._fault_hook: Callable[[list[int], int], None] | None = None

    # -- submission --------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, Sequence | np.ndarray):
            ids = [int(t) for t in prompt]
        else:
            raise TypeError(f"prompt must be a str or a list of token ids, got {prompt!r}")
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:8]} outside the vocabulary [0, {vocab})")
        return ids

    @property
    def max_context(self) -> int:
        """Prompt + generated tokens one request may hold: ``EngineConfig.max_seq_len``,
        or the model's ``max_position_embeddings`` where that is smaller."""
        return min(self.config.max_seq_len, self.model.config.max_position_embeddings)

    def _context_limit(self) -> str:
        """Which setting ``max_context`` comes from, for error messages."""
        mc = self.model.config.max_position_embeddings
        if mc < self.config.max_seq_len:
            return f"model.config.max_position_embeddings={mc}"
        return f"EngineConfig.max_seq_len={self.config.max_seq_len}"

    def _check_fits(self, ids: list[int], params: SamplingParams) -> None:
        limit = self.max_context
        n, total = len(ids), len(ids) + params.max_tokens
        if n >= limit:  # not even one token would fit after it
            message = (
                f"prompt of {n} tokens is too long: the maximum context is {limit} tokens "
                f"(prompt + generated, {self._context_limit()})"
            )
        elif total > limit:
            message = (
                f"prompt of {n} tokens + max_tokens={params.max_tokens} exceeds the maximum "
                f"context of {limit} tokens ({self._context_limit()}); at most "
                f"max_tokens={limit - n} fits"
            )
        else:
            message = None
        if message is not None:
            raise ContextLengthError(
                message, prompt_tokens=n, max_tokens=params.max_tokens, max_context=limit
            )
        needed = pages_for(total, self.config.page_size)
        if needed > self._pool.capacity:
            raise ValueError(
                f"request needs {needed} KV pages but the pool has {self._pool.capacity} "
                f"(EngineConfig.num_pages={self.config.num_pages} incl. the scratch page): "
                "it can never fit"
            )

    def _make_request(self, prompt: Prompt, params: SamplingParams | None, sink) -> Request:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, got {type(params).__name__}")
        ids = self._encode(prompt)
        self._check_fits(ids, params)
        stop_ids = set(params.stop_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and not params.ignore_eos:
            stop_ids.add(eos)
        with self._cond:  # callers may submit from several threads
            seed = params.seed if params.seed is not None else int(self._seeds.integers(2**32))
            request_id = next(self._ids)
        request = Request(request_id, ids, params, seed, frozenset(stop_ids), sink)
        request.decoder = IncrementalDecoder(self.tokenizer, params.stop)
        return request

    def _enqueue(self, request: Request) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            try:
                self._scheduler.add(request)
            except QueueFullError:
                self._metrics.rejected += 1
                raise
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="capibara", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def submit(self, prompt: Prompt, sampling: SamplingParams | None = None, sink=None) -> int:
        """Queues one request; returns its id. Raises ``ValueError``/``TypeError`` for a
        bad prompt or parameters (``ContextLengthError``, a ``ValueError``, when prompt
        + ``max_tokens`` exceed ``max_context``) and ``QueueFullError`` when the queue
        is full -- in every case before anything is queued."""
        request = self._make_request(prompt, sampling, sink or _SyncSink())
        self._enqueue(request)
        return request.id

    # -- the step loop -----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            try:
                self._iteration()
            except Exception as e:  # a bug in the loop itself: fail what runs, keep serving
                with self._cond:
                    for r in list(self._scheduler.running):
                        self._finish(r, "error", f"engine step failed: {e!r}")

    def _iteration(self) -> None:
        """One step: plan under the lock, compute outside it, apply under it."""
        with self._cond:
            while not self._stopping and not self._scheduler.has_work():
                self._cond.wait()
            if self._stopping:
                return
            plan = self._scheduler.schedule()
        if not plan.prefills and not plan.decode:
            time.sleep(0.001)  # nothing runnable this instant (cannot persist)
            return
        start = time.perf_counter()
        try:
            out, load = self._runner.run(plan)
        except Exception as e:  # a failed step fails its own requests only
            with self._cond:
                for r in [*plan.decode, *(r for r, _ in plan.prefills)]:
                    if r.state == RUNNING:
                        self._finish(r, "error", f"step failed: {e!r}")
            return
        with self._cond:
            self._apply(plan, out, load, time.perf_counter() - start)

    def _apply(self, plan, out, load, seconds) -> None:
        new_tokens = 0
        for step in out.tolist():  # [plan.steps][rows]
            for r in plan.decode:
                # Else cancelled while the step ran, or stopped earlier in the burst
                # (its later tokens are dropped).
                if r.state == RUNNING:
                    r.num_cached += 1
                    self._scheduler.register_blocks(r)
                    self._emit(r, step[r.slot])
                    new_tokens += 1
        for row, (r, chunk) in enumerate(plan.prefills):
            if r.state != RUNNING:
                continue
            r.num_cached += chunk
            self._scheduler.register_blocks(r)
            if r.uncached == 0:  # the chunk reached the end: its last logits are the next token
                self._emit(r, int(out[0, self.config.max_slots + row]))
                new_tokens += 1
        self._metrics.record_step(seconds, new_tokens, load, steps=plan.steps)
        self._cond.notify_all()

    def _emit(self, r: Request, token: int) -> None:
        try:
            if self._fault_hook is not None:
                self._fault_hook(r.prompt, len(r.output) + 1)
            r.first_token = r.first_token or time.perf_counter()
            r.output.append(token)
            stop = token in r.stop_ids
            text = r.decoder.push(None if stop else token)
            if text or not stop:
                r.sink.on_token(r, token, text)
            if stop or r.decoder.stopped:
                self._finish(r, "stop")
            elif r.tokens_left(self.config.max_seq_len) <= 0:
                self._finish(r, "length")
        except Exception as e:  # per-request failure: the others go on
            if r.state != FINISHED:
                self._finish(r, "error", repr(e))

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        self._scheduler.remove(r)  # slot and pages freed now
        now = time.perf_counter()
        r.finish_reason, r.error, r.finished_at = reason, error, now
        n = len(r.output)
        ttft = None if r.first_token is None else r.first_token - r.arrival
        tpot = (now - r.first_token) / (n - 1) if r.first_token is not None and n > 1 else None
        metrics = RequestMetrics(
            prompt_tokens=len(r.prompt),
            generated_tokens=n,
            cached_prompt_tokens=r.cached_prompt_tokens,
            preemptions=r.preemptions,
            queue_time=(r.first_scheduled or now) - r.arrival,
            ttft=ttft,
            tpot=tpot,
            e2e=now - r.arrival,
        )
        self._metrics.record_finish(reason, metrics)
        try:
            tail = r.decoder.flush()
            text = r.decoder.text
        except Exception as e:
            tail, text, reason, error = "", "", "error", error or repr(e)
        generation = Generation(
            request_id=r.id,
            # Copies: the caller may change its lists; the request's stay the engine's.
            prompt_token_ids=list(r.prompt),
            token_ids=list(r.output),
            text=text,
            finish_reason=reason,
            metrics=metrics,
            error=error,
        )
        # A consumer that is gone (e.g. its event loop closed) gets nothing delivered.
        with contextlib.suppress(Exception):
            r.sink.on_finish(r, generation, tail)
        self._cond.notify_all()

    # -- public API --------------------------------------------------------------------
    def _sampling_list(self, n: int, sampling) -> list[SamplingParams | None]:
        if sampling is None or isinstance(sampling, SamplingParams):
            return [sampling] * n
        sampling = list(sampling)
        if len(sampling) != n:
            raise ValueError(f"got {len(sampling)} SamplingParams for {n} prompts")
        return sampling

    def generate_batch(
        self, prompts: Sequence[Prompt], sampling: SamplingParams | Sequence | None = None
    ) -> list[Generation]:
        """Generates for every prompt (continuously batched); blocks until all finish.

        Every prompt is validated before any is queued; when the queue is full the
        call waits for room instead of raising.
        """
        if isinstance(prompts, str):
            raise TypeError("generate_batch takes a list of prompts, got one str")
        params = self._sampling_list(len(prompts), sampling)
        requests = [
            self._make_request(p, s, _SyncSink()) for p, s in zip(prompts, params, strict=True)
        ]
        for request in requests:
            while True:
                try:
                    self._enqueue(request)
                    break
                except QueueFullError:
                    with self._cond:
                        self._cond.wait(timeout=0.05)
        for request in requests:
            request.sink.done.wait()
        return [request.sink.generation for request in requests]

    async def generate_async(
        self, prompts: Prompt | Sequence[Prompt], sampling: SamplingParams | Sequence | None = None
    ) -> Generation | list[Generation]:
        """Awaitable generation of one prompt (a str or a list of ids) or a list of them.

        Cancelling the awaiting task cancels the requests and frees their slots and
        pages at once. Raises ``QueueFullError`` when the queue is full.
        """
        single = isinstance(prompts, str) or (
            isinstance(prompts, Sequence | np.ndarray)
            and len(prompts) > 0
            and isinstance(prompts[0], int | np.integer)
        )
        prompt_list = [prompts] if single else list(prompts)
        params = self._sampling_list(len(prompt_list), sampling)
        loop = asyncio.get_running_loop()
        requests = [
            self._make_request(p, s, _AsyncSink(loop))
            for p, s in zip(prompt_list, params, strict=True)
        ]
        try:
            for request in requests:
                self._enqueue(request)
            results = await asyncio.gather(*(r.sink.future for r in requests))
        finally:
            for request in requests:
                self._abort(request)
        return results[0] if single else list(results)

    async def stream(
        self, prompt: Prompt, sampling: SamplingParams | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Yields a ``StreamEvent`` per token; the last one carries the ``Generation``.

        Closing the iterator (``aclose``, ``break`` then garbage collection) or
        cancelling its task cancels the request and frees its slot and pages at once.
        """
        async with self.open_stream(prompt, sampling) as events:
            async for event in events:
                yield event

    def open_stream(self, prompt: Prompt, sampling: SamplingParams | None = None) -> EventStream:
        """Submits one request now and returns its ``EventStream``.

        Unlike ``stream`` (which submits at its first iteration), every submission
        error -- ``ValueError``/``TypeError``, ``ContextLengthError``,
        ``QueueFullError`` -- raises here, before the caller commits to anything (an
        HTTP server answers 400/429 before sending a streamed response's headers).
        Call it from the event loop that reads the events.
        """
        sink = _AsyncSink(asyncio.get_running_loop())
        request = self._make_request(prompt, sampling, sink)
        self._enqueue(request)
        return EventStream(self, request, sink)

    def _abort(self, request: Request) -> None:
        with self._cond:
            if request.state != FINISHED:
                self._finish(request, "cancelled")

    def close(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """Stops the engine: cancels every queued and running request (``drain=False``)
        or lets them finish first (``drain=True``). Later submissions raise."""
        with self._cond:
            self._closed = True
            if drain:
                end = None if timeout is None else time.monotonic() + timeout
                while self._scheduler.has_work() and self._thread is not None:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cond.wait(timeout=left)
            for r in [*self._scheduler.waiting, *self._scheduler.running]:
                self._finish(r, "cancelled")
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- introspection -----------------------------------------------------------------
    @property
    def num_compilations(self) -> int:
        """Step shapes run so far, each compiled once per process (at most ``1 +
        len(config.prefill_buckets)``, whatever the workload)."""
        return len(self._runner.shapes)

    def page_counts(self) -> dict[str, int]:
        """``free``, ``capacity`` and ``prefix_cache`` pages of the pool."""
        with self._cond:
            return {
                "free": self._pool.num_free,
                "capacity": self._pool.capacity,
                "prefix_cache": len(self._prefix) if self._prefix else 0,
            }

    def set_fault_hook(self, hook: Callable[[list[int], int], None] | None) -> None:
        """Test-only fault injection: ``hook(prompt_ids, n)`` runs in the engine thread
        before a request's ``n``-th token is delivered (``n`` from 1); an exception it
        raises fails that request alone (``finish_reason="error"``), as any failure
        while delivering a request's tokens does. ``None`` removes it. ``capibara
        serve`` installs one from ``CAPIBARA_SERVE_FAULT_PROMPT`` (docs/serving.md)."""
        with self._cond:
            self._fault_hook = hook

    def reset_metrics(self) -> None:
        """Forgets the metrics history (counters, latency windows), e.g. after a
        warm-up whose compile-time latencies would skew every figure."""
        with self._cond:
            self._metrics = EngineMetrics()

    def clear_prefix_cache(self) -> None:
        with self._cond:
            if self._prefix is not None:
                self._prefix.clear()

    def metrics(self) -> MetricsSnapshot:
        with self._cond:
            return self._metrics.snapshot(
                scheduler=self._scheduler,
                prefix_cache=self._prefix,
                compilations=self.num_compilations,
            )

    def metrics_text(self) -> str:
        """``metrics()`` in the Prometheus text exposition format."""
        return prometheus_text(self.metrics())
