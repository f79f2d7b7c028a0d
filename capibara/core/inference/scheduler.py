"""Continuous batching: which requests run this step, and with which pages.

Every request is ``tokens = prompt + output`` with the first ``num_cached`` of them in
the KV cache. A request with more than one uncached token needs prefill; with exactly
one (the last sampled token) it decodes. Each step:

1. admits waiting requests while a slot is free and the pool can hold their tokens
   (prefix-cache hits first, so shared pages are not counted twice);
2. picks the ``prefill_rows`` oldest prefilling requests for one chunk each of up to
   ``prefill_chunk`` tokens;
3. decodes every other running request by one token -- or, with no prefill in the
   step, by up to ``decode_steps`` tokens in a burst that ends when the first of them
   is due to finish;
4. gives each of them the pages its new tokens need. Out of pages: evict unused
   prefix-cache pages, then preempt the newest running request (its pages freed, it
   goes back to the front of the queue and is recomputed later). The oldest request
   can always proceed, because a request that could not fit alone was rejected at
   submission: no deadlock.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

from capibara.core.inference.kv_cache import OutOfPagesError, PagePool
from capibara.core.inference.params import EngineConfig, QueueFullError, SamplingParams
from capibara.core.inference.prefix_cache import ROOT, PrefixCache

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """One request's state (host side; owned by the engine thread)."""

    id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    sink: Any  # receives on_token(request, token_id) / on_finish(request)
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    output: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    block_hashes: list[int] = dataclasses.field(default_factory=list)  # cached full blocks
    num_cached: int = 0
    slot: int | None = None
    state: str = WAITING
    first_scheduled: float | None = None
    first_token: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    cached_prompt_tokens: int = 0
    preemptions: int = 0
    decoder: Any = None  # IncrementalDecoder, set by the engine

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def uncached(self) -> int:
        return len(self.prompt) + len(self.output) - self.num_cached

    def tokens_left(self, max_seq_len: int) -> int:
        """Tokens it may still generate: it finishes ("length") when this reaches 0."""
        return min(self.params.max_tokens - len(self.output), max_seq_len - len(self.tokens))


@dataclasses.dataclass
class StepPlan:
    """What one step computes: the decode rows and up to ``prefill_rows`` prefill chunks."""

    decode: list[Request]
    # (request, real tokens in its chunk), oldest first
    prefills: list[tuple[Request, int]] = dataclasses.field(default_factory=list)
    bucket: int = 0  # padded chunk length of every prefill row (a compiled shape)
    steps: int = 1  # decode steps run back to back (more than one only without prefills)


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class Scheduler:
    def __init__(self, config: EngineConfig, pool: PagePool, prefix_cache: PrefixCache | None):
        self.config = config
        self.pool = pool
        self.prefix_cache = prefix_cache
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order: the last is the newest
        self.free_slots = list(range(config.max_slots))[::-1]
        self.num_preemptions = 0

    # -- queue -------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(
                f"{len(self.waiting)} requests are waiting (EngineConfig.max_waiting="
                f"{self.config.max_waiting}); retry later"
            )
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request: Request) -> None:
        """Takes ``request`` out of the queue or the batch, freeing its slot and pages."""
        if request.state == WAITING:
            self.waiting.remove(request)
        elif request.state == RUNNING:
            self._release(request)
            self.running.remove(request)
        request.state = FINISHED

    def _release(self, request: Request) -> None:
        for page in request.pages:
            self.pool.release(page)
        request.pages, request.block_hashes, request.num_cached = [], [], 0
        self.free_slots.append(request.slot)
        request.slot = None

    # -- pages -------------------------------------------------------------------------
    def _available(self) -> int:
        evictable = self.prefix_cache.num_evictable() if self.prefix_cache else 0
        return self.pool.num_free + evictable

    def _allocate(self) -> int:
        if self.pool.num_free == 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(1)
        return self.pool.allocate()

    def _grow(self, request: Request, num_tokens: int) -> None:
        """Pages so that ``request`` can hold ``num_tokens`` tokens (may raise)."""
        while len(request.pages) < pages_for(num_tokens, self.config.page_size):
            request.pages.append(self._allocate())

    def _preempt(self, request: Request) -> None:
        self._release(request)
        self.running.remove(request)
        request.state = WAITING
        request.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # -- one step ----------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            request = self.waiting[0]
            tokens = request.tokens
            pages, hashes = [], []
            if self.prefix_cache is not None:
                pages, hashes = self.prefix_cache.match(tokens)
            needed = pages_for(len(tokens) + 1, self.config.page_size) - len(pages)
            if needed > self._available():
                for page in pages:  # give the matched pages back: not admitted
                    self.pool.release(page)
                break
            self.waiting.popleft()
            request.pages, request.block_hashes = pages, hashes
            request.num_cached = len(pages) * self.config.page_size
            if request.preemptions == 0:
                request.cached_prompt_tokens = request.num_cached
            request.slot = self.free_slots.pop()
            request.state = RUNNING
            request.first_scheduled = request.first_scheduled or time.perf_counter()
            self.running.append(request)

    def schedule(self) -> StepPlan:
        """Admits, chooses this step's work and gives it pages (preempting if need be)."""
        self._admit()
        prefills = [r for r in self.running if r.uncached > 1][: self.config.prefill_rows]
        plan = StepPlan(decode=[])
        for request in list(self.running):
            if request.state != RUNNING:
                continue  # preempted while placing an older request
            if request in prefills:
                n = min(request.uncached, self.config.prefill_chunk)
                want = request.num_cached + n
            elif request.uncached == 1:
                want = request.num_cached + 1
            else:
                continue  # prefill pending behind this step's chunks
            while True:
                try:
                    self._grow(request, want)
                    break
                except OutOfPagesError:
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is request:
                        break
            if request.state != RUNNING:
                continue
            if request in prefills:
                plan.prefills.append((request, n))
            else:
                plan.decode.append(request)
        plan.decode = [r for r in plan.decode if r.state == RUNNING]
        plan.prefills = [(r, n) for r, n in plan.prefills if r.state == RUNNING]
        if plan.prefills:
            longest = max(n for _, n in plan.prefills)
            plan.bucket = next(b for b in self.config.prefill_buckets if b >= longest)
        elif plan.decode:
            plan.steps = self._burst(plan.decode)
        return plan

    def _burst(self, decode: list[Request]) -> int:
        """Decode steps for a plan without prefills, each row's pages grown for them.

        As many as ``decode_steps`` allows without outrunning any row's token limit:
        the burst ends when the first row is due to finish, so its slot frees with
        it. One step when the pool cannot hold the burst's pages (the single step's
        pages are already placed, with preemption if need be)."""
        limit = self.config.max_seq_len
        steps = min(self.config.decode_steps, *(r.tokens_left(limit) for r in decode))
        steps = max(steps, 1)  # (a running row always has a token left; never stall)
        if steps > 1:
            ps = self.config.page_size
            needed = sum(pages_for(r.num_cached + steps, ps) - len(r.pages) for r in decode)
            if needed > self._available():
                return 1
            for request in decode:
                self._grow(request, request.num_cached + steps)
        return steps

    def register_blocks(self, request: Request) -> None:
        """Offers the request's newly completed full pages to the prefix cache."""
        if self.prefix_cache is None:
            return
        page_size = self.config.page_size
        tokens = request.tokens
        while (len(request.block_hashes) + 1) * page_size <= request.num_cached:
            i = len(request.block_hashes)
            parent = request.block_hashes[-1] if request.block_hashes else ROOT
            block = tuple(tokens[i * page_size : (i + 1) * page_size])
            request.block_hashes.append(self.prefix_cache.insert(parent, block, request.pages[i]))
