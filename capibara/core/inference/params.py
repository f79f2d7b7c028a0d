"""The engine's public value types: ``EngineConfig``, ``SamplingParams``, ``Generation``.

All are frozen dataclasses validated on construction; an impossible value raises
``ValueError``/``TypeError`` naming the field, before anything is queued.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax


class QueueFullError(RuntimeError):
    """The waiting queue holds ``EngineConfig.max_waiting`` requests: retry later."""


class ContextLengthError(ValueError):
    """A request that cannot fit the context (a client error, HTTP 400 in a server).

    ``max_context`` is the engine's limit on prompt + generated tokens: the smaller of
    ``EngineConfig.max_seq_len`` and the model's ``max_position_embeddings``. Raised at
    submission, before anything is queued, so no other request sees it.
    """

    def __init__(self, message: str, *, prompt_tokens: int, max_tokens: int, max_context: int):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_context = max_context

    def __reduce__(self):  # pickles (e.g. to another process) with its fields
        fields = dict(
            prompt_tokens=self.prompt_tokens,
            max_tokens=self.max_tokens,
            max_context=self.max_context,
        )
        return functools.partial(type(self), **fields), self.args


def _int(obj, name: str, *, minimum: int) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{type(obj).__name__}.{name} must be an int >= {minimum}, got {value!r}")


def _number(obj, name: str, lo: float, hi: float, *, lo_open=False) -> None:
    value = getattr(obj, name)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ValueError(
            f"{type(obj).__name__}.{name} must be a number in {bracket}{lo}, {hi}], got {value!r}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Sizes of the engine; every shape it compiles for follows from these.

    The KV cache holds ``num_pages`` pages of ``page_size`` tokens per layer (page 0 is
    a scratch page, so ``num_pages - 1`` are usable): ``2 · layers · Hkv · D ·
    page_size · num_pages`` values in the model's compute dtype.
    """

    max_slots: int = 8  # sequences decoded together (the decode batch, always this size)
    max_seq_len: int = 512  # prompt + generated tokens of one request
    page_size: int = 16  # tokens per KV page
    num_pages: int = 256  # pages in the pool, the scratch page included
    max_waiting: int = 1024  # queued requests before submit raises QueueFullError
    prefill_chunk: int = 64  # prompt tokens per prefill step (the largest bucket)
    min_prefill_bucket: int = 16  # smallest prefill bucket; buckets double up to the chunk
    # Prompts prefilled together, one chunk each. A step with any prefill always has
    # this many rows (idle ones padded), so it stays one compiled shape per bucket:
    # more rows admit a burst of requests in fewer steps, and cost a lone prompt
    # ``prefill_rows`` times its chunk's compute.
    prefill_rows: int = 1
    prefix_cache: bool = True  # share page-aligned prompt prefixes between requests
    # Decode steps per dispatch when no prefill is pending: one compiled program runs
    # up to this many steps, feeding each step's tokens to the next on the device, so
    # the host's per-step work (planning, inputs, dispatch, applying tokens) is paid
    # once per burst. A burst never outruns a request's max_tokens / max_seq_len; a
    # stop token inside one drops that row's later tokens. Costs: tokens stream in
    # bursts, and a request arriving mid-burst waits for it to end to start.
    decode_steps: int = 8
    seed: int = 0  # draws the seed of requests that give none
    # Serve from an [out, in] copy of the dense weights (``serving_layout.py``): faster
    # bf16 decode steps on CPU, for the memory of that copy while the caller keeps its
    # model. None: where capibara.kernels.decode_matmul's native kernel runs the model (CPU,
    # bf16 compute, the kernel built); XLA's f32 dot is slower on that layout.
    out_in_weights: bool | None = None
    # Serve tensor/data-parallel on this ``jax.sharding.Mesh`` (axes ``data``/``model``):
    # the model is placed with ``capibara.shard`` unless it already is, and the KV pools
    # are split over kv heads on ``model``. None: the model's own mesh if its parameters
    # are placed on one, else one device.
    mesh: object | None = None

    def __post_init__(self):
        for name, minimum in (
            ("max_slots", 1),
            ("max_seq_len", 2),
            ("page_size", 1),
            ("num_pages", 2),
            ("max_waiting", 1),
            ("prefill_chunk", 1),
            ("min_prefill_bucket", 1),
            ("prefill_rows", 1),
            ("decode_steps", 1),
            ("seed", 0),
        ):
            _int(self, name, minimum=minimum)
        if self.min_prefill_bucket > self.prefill_chunk:
            raise ValueError(
                f"EngineConfig.min_prefill_bucket={self.min_prefill_bucket} must be <= "
                f"prefill_chunk={self.prefill_chunk}"
            )
        if not isinstance(self.prefix_cache, bool):
            raise TypeError(f"EngineConfig.prefix_cache must be a bool, got {self.prefix_cache!r}")
        if self.mesh is not None and not isinstance(self.mesh, jax.sharding.Mesh):
            raise TypeError(
                f"EngineConfig.mesh must be a jax.sharding.Mesh or None, got {self.mesh!r}"
            )
        if self.out_in_weights is not None and not isinstance(self.out_in_weights, bool):
            raise TypeError(
                f"EngineConfig.out_in_weights must be a bool or None, got {self.out_in_weights!r}"
            )

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        """Padded prefill lengths: ``min_prefill_bucket`` doubling, then ``prefill_chunk``."""
        buckets, size = [], self.min_prefill_bucket
        while size < self.prefill_chunk:
            buckets.append(size)
            size *= 2
        return (*buckets, self.prefill_chunk)

    @property
    def pages_per_seq(self) -> int:
        """Page-table width: a whole sequence plus a padded chunk past its end."""
        return -(-(self.max_seq_len + self.prefill_chunk) // self.page_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request's tokens are drawn.

    ``temperature=0`` is greedy (``top_k``/``top_p``/``min_p`` then do nothing). The
    filters apply to the temperature-scaled distribution, as in transformers. A
    request's random stream is ``fold_in(key(seed), i)`` for its ``i``-th token, so
    the same seed gives the same tokens whatever else shares the batch.
    """

    max_tokens: int = 16  # generated tokens at most
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set with this much probability; 1: off
    min_p: float = 0.0  # drop tokens below min_p · p(most likely); 0: off
    seed: int | None = None  # None: drawn from the engine's seed
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    stop_token_ids: tuple[int, ...] = ()  # stop tokens (kept in token_ids, not in text)
    ignore_eos: bool = False  # don't stop at the tokenizer's end-of-sequence token

    def __post_init__(self):
        # Lists are accepted and frozen into tuples (the dataclass stays hashable).
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, str | int):
                value = (value,)
            if not isinstance(value, list | tuple):
                raise TypeError(f"SamplingParams.{name} must be a sequence, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        _int(self, "max_tokens", minimum=1)
        _number(self, "temperature", 0.0, 1e4)
        _int(self, "top_k", minimum=0)
        _number(self, "top_p", 0.0, 1.0, lo_open=True)
        _number(self, "min_p", 0.0, 1.0)
        if self.seed is not None:
            _int(self, "seed", minimum=0)
            if self.seed >= 2**32:
                raise ValueError(f"SamplingParams.seed must be < 2**32, got {self.seed}")
        bad = [s for s in self.stop if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {bad!r}")
        bad = [t for t in self.stop_token_ids if not isinstance(t, int) or t < 0]
        if bad:
            raise ValueError(f"SamplingParams.stop_token_ids must be ints >= 0, got {bad!r}")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"SamplingParams.ignore_eos must be a bool, got {self.ignore_eos!r}")


FINISH_REASONS = ("length", "stop", "cancelled", "error")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestMetrics:
    """Timings of one request, in seconds (``None`` before its first token)."""

    prompt_tokens: int
    generated_tokens: int
    cached_prompt_tokens: int  # prompt tokens served from the prefix cache
    preemptions: int  # times it was evicted and recomputed
    queue_time: float  # arrival -> first scheduled
    ttft: float | None  # arrival -> first token
    tpot: float | None  # mean time per output token after the first
    e2e: float  # arrival -> finish


@dataclasses.dataclass(frozen=True, kw_only=True)
class Generation:
    """A finished request: ``text``, ``token_ids`` and why it stopped.

    ``token_ids`` and ``prompt_token_ids`` are lists (``gen.token_ids == [1, 2]``
    compares as expected), each the generation's own copy. They are left out of the
    hash, so a ``Generation`` stays hashable (equal generations still hash equal:
    the hash reads a subset of the compared fields).

    ``finish_reason`` is ``"length"`` (max_tokens or max_seq_len), ``"stop"`` (a stop
    string or token), ``"cancelled"`` or ``"error"`` (then ``error`` says why; the
    other requests are unaffected).
    """

    request_id: int
    prompt_token_ids: list[int] = dataclasses.field(hash=False)
    token_ids: list[int] = dataclasses.field(hash=False)
    text: str
    finish_reason: str
    metrics: RequestMetrics
    error: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamEvent:
    """One streamed token: its id and the text it completes (may be ``""`` while a
    multi-byte character or a possible stop string is held back). The last event has
    ``generation`` set."""

    token_id: int | None
    text: str
    generation: Generation | None = None
