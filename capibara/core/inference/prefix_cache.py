"""Prefix cache: full pages of already-computed tokens, shared between requests.

A sequence's tokens are cut into page-aligned blocks; block ``i`` is keyed by the
hash chain ``h_i = hash((h_{i-1}, tokens of block i))``, so a key names the whole
prefix up to the end of its block, not just the block. A request whose first blocks'
keys are cached takes those pages into its page table (reference count +1) and
prefills only the rest. Entries hold their own reference; when the pool runs dry,
entries that only the cache still holds are evicted, least recently used first.

NOTE: cached pages are full and never written again: a sequence writes only at
positions past its cached length, and a match always leaves at least one token to
compute (its logits give the next token).
"""

from __future__ import annotations

import collections
import dataclasses

from capibara.core.inference.kv_cache import PagePool

ROOT = 0  # the hash-chain value before the first block


@dataclasses.dataclass(frozen=True)
class _Entry:
    page: int
    parent: int
    tokens: tuple[int, ...]  # checked on lookup: a hash collision is a miss, not a bug


def chain_hash(parent: int, block: tuple[int, ...]) -> int:
    return hash((parent, block))


class PrefixCache:
    """Chain hash -> page, LRU-ordered, with hit statistics."""

    def __init__(self, pool: PagePool, page_size: int):
        self.pool = pool
        self.page_size = page_size
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of which found

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, tokens: list[int]) -> tuple[list[int], list[int]]:
        """The cached pages of the longest cached prefix of ``tokens`` (retained for the
        caller) and their chain hashes; leaves at least one token uncached."""
        pages, hashes, parent = [], [], ROOT
        for i in range((len(tokens) - 1) // self.page_size):
            block = tuple(tokens[i * self.page_size : (i + 1) * self.page_size])
            key = chain_hash(parent, block)
            entry = self._entries.get(key)
            if entry is None or entry.parent != parent or entry.tokens != block:
                break
            self._entries.move_to_end(key)
            self.pool.retain(entry.page)
            pages.append(entry.page)
            hashes.append(key)
            parent = key
        self.queried_tokens += len(tokens)
        self.hit_tokens += len(pages) * self.page_size
        return pages, hashes

    def insert(self, parent: int, block: tuple[int, ...], page: int) -> int:
        """Offers a full ``page`` holding ``block`` after the prefix ``parent``; returns
        the block's chain hash. A prefix already cached keeps its own page."""
        key = chain_hash(parent, block)
        if key in self._entries:
            self._entries.move_to_end(key)
        else:
            self.pool.retain(page)
            self._entries[key] = _Entry(page, parent, block)
        return key

    def num_evictable(self) -> int:
        return sum(1 for e in self._entries.values() if self.pool.refcounts[e.page] == 1)

    def evict(self, count: int = 1) -> int:
        """Drops up to ``count`` least recently used entries that no sequence uses;
        returns how many pages went back to the free list."""
        freed = 0
        for key in list(self._entries):
            if freed == count:
                break
            entry = self._entries[key]
            if self.pool.refcounts[entry.page] == 1:
                del self._entries[key]
                self.pool.release(entry.page)
                freed += 1
        return freed

    def clear(self) -> None:
        for entry in self._entries.values():
            self.pool.release(entry.page)
        self._entries.clear()

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
