"""Random paged KV caches for the paged-attention tests.

Every pool slot that no sequence has written holds NaN, and every page-table entry
that the sequence does not use holds garbage (huge, negative), so a kernel that reads
an unused entry or lets an unwritten token reach the output fails loudly.
"""

from __future__ import annotations

import numpy as np

GARBAGE = (10**6, -7, 2**31 - 1, -(2**31))


def make_cache(
    rng,
    *,
    lengths,
    num_queries: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pages_per_seq: int,
    dtype,
    evicted_before=None,
):
    """Returns ``(q, k_pages, v_pages, lengths, page_table)`` as numpy arrays.

    Args:
      lengths: cached tokens per sequence (at most ``pages_per_seq * page_size``).
      num_queries: ``S``; ``q`` is ``[B, S, Hq, D]``.
      evicted_before: optional per-sequence token position; pages wholly before it are
        "evicted" (their table entries garbage, their pool pages NaN), as a
        sliding-window cache may do.
    """
    lengths = np.asarray(lengths, np.int32)
    batch = len(lengths)
    used = -(-lengths // page_size)  # pages each sequence has written
    num_pages = int(used.sum()) + 3  # a few pages nobody owns (NaN)
    k_pages = np.full((num_kv_heads, num_pages, page_size, head_dim), np.nan, np.float32)
    v_pages = np.full_like(k_pages, np.nan)
    page_table = np.empty((batch, pages_per_seq), np.int64)
    free = rng.permutation(num_pages)
    for b in range(batch):
        page_table[b] = rng.choice(GARBAGE, pages_per_seq)
        first = 0 if evicted_before is None else int(evicted_before[b]) // page_size
        for j in range(used[b]):
            page = free[0]
            free = free[1:]
            if j < first:
                continue  # evicted: the table entry stays garbage, the page NaN
            page_table[b, j] = page
            n = min(page_size, lengths[b] - j * page_size)  # tokens written in this page
            shape = (num_kv_heads, n, head_dim)
            k_pages[:, page, :n] = rng.standard_normal(shape)
            v_pages[:, page, :n] = rng.standard_normal(shape)
    q = rng.standard_normal((batch, num_queries, num_q_heads, head_dim)).astype(np.float32)
    cast = lambda x: x.astype(dtype)
    return cast(q), cast(k_pages), cast(v_pages), lengths, page_table.astype(np.int32)


def contiguous_cache(k_pages, v_pages, lengths, page_table):
    """Independent gather (numpy): ``[B, T, Hkv, D]`` k and v, zeros past each length."""
    hkv, _, page_size, d = k_pages.shape
    batch, pages_per_seq = page_table.shape
    t = pages_per_seq * page_size
    k = np.zeros((batch, t, hkv, d), np.float32)
    v = np.zeros_like(k)
    for b in range(batch):
        for pos in range(lengths[b]):
            page = page_table[b, pos // page_size]
            k[b, pos] = np.asarray(k_pages[:, page, pos % page_size], np.float32)
            v[b, pos] = np.asarray(v_pages[:, page, pos % page_size], np.float32)
    return k, v
