"""The paged KV cache: device page pools and the host-side page bookkeeping.

The device side is one ``(k_pages, v_pages)`` pair per layer, each ``[Hkv, P,
page_size, D]`` (the layout of ``capibara.kernels.paged_attention``). The host side,
``PagePool``, owns which of the ``P`` pages are free: a free list and a reference
count per page. A page is referenced by each running sequence whose page table holds
it and by the prefix cache while it keeps it; it returns to the free list when the
count reaches zero.

NOTE: page 0 is the scratch page. It is never handed out: padding tokens and idle
decode rows write their k/v there, and no sequence ever reads it.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

from capibara.core.config import CapibaraConfig
from capibara.core.layers import dtype_of

SCRATCH_PAGE = 0


class OutOfPagesError(RuntimeError):
    """No free page: the scheduler evicts cached prefixes or preempts a request."""


class PagePool:
    """Free list and reference counts of ``num_pages`` pages (page 0 reserved)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self.refcounts = np.zeros(num_pages, np.int32)
        self._free = collections.deque(range(1, num_pages))

    @property
    def capacity(self) -> int:
        """Pages a sequence can ever use (all but the scratch page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """A free page with reference count 1."""
        if not self._free:
            raise OutOfPagesError("no free KV page")
        page = self._free.popleft()
        self.refcounts[page] = 1
        return page

    def retain(self, page: int) -> None:
        if self.refcounts[page] <= 0:
            raise ValueError(f"retain of free page {page}")
        self.refcounts[page] += 1

    def release(self, page: int) -> None:
        if self.refcounts[page] <= 0:
            raise ValueError(f"release of free page {page} (double free)")
        self.refcounts[page] -= 1
        if self.refcounts[page] == 0:
            self._free.append(page)

    def check(self) -> None:
        """Invariant: a page is free exactly when its count is 0 (and listed once)."""
        free = list(self._free)
        assert len(set(free)) == len(free), "page listed twice in the free list"
        zero = {int(p) for p in np.flatnonzero(self.refcounts == 0)} - {SCRATCH_PAGE}
        assert zero == set(free), "free list and reference counts disagree"


def allocate_cache(
    config: CapibaraConfig, num_pages: int, page_size: int
) -> list[tuple[jax.Array, jax.Array]]:
    """Zeroed ``(k_pages, v_pages)`` per layer, ``[Hkv, num_pages, page_size, D]``, in the
    model's compute dtype."""
    shape = (config.num_kv_heads, num_pages, page_size, config.resolved_head_dim)
    dtype = dtype_of(config.compute_dtype)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)]


def cache_bytes(config: CapibaraConfig, num_pages: int, page_size: int) -> int:
    per_layer = 2 * config.num_kv_heads * num_pages * page_size * config.resolved_head_dim
    return per_layer * config.num_layers * dtype_of(config.compute_dtype).itemsize
