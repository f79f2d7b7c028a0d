"""The masking rule shared by every implementation of paged attention.

Sequence ``b`` holds ``lengths[b]`` cached tokens at positions ``0 .. lengths[b] - 1``.
A call brings ``num_queries`` query tokens per sequence: the *last* ``num_queries``
tokens of that sequence, so query ``j`` sits at position
``lengths[b] - num_queries + j`` (bottom-right aligned, as in prefill onto a cache).
Query position ``p`` sees key position ``t`` iff

    0 <= t < lengths[b]  and  t <= p  and  (no window or t > p - sliding_window)

so decode (one query, ``p = lengths[b] - 1``) sees the whole cache, or its last
``sliding_window`` keys. A query that sees nothing (``lengths[b] == 0``, or a query
slot left-padded to a negative position) returns zeros.
"""

from __future__ import annotations

import jax.numpy as jnp

# Finite "minus infinity" for masked logits and the running max: exp(NEG - NEG) = 1
# stays finite where -inf - -inf would be NaN (a row with nothing visible yet).
NEG = -1e30


def visible(q_pos, k_pos, length, sliding_window: int | None):
    """Boolean mask: query position ``q_pos`` sees key position ``k_pos`` (broadcasting)."""
    mask = (k_pos >= 0) & (k_pos < length) & (k_pos <= q_pos)
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def live_range(lengths, num_queries: int, sliding_window: int | None, *, xp=jnp):
    """``(lo, hi)``: the key positions ``[lo, hi)`` some query of the sequence sees.

    Keys outside this range are never read for the result: pages wholly outside it are
    skipped, and whatever they hold (stale or NaN data, evicted pages) is ignored.
    ``xp``: ``jax.numpy``, or ``numpy`` for the host-side input checks.
    """
    hi = lengths
    if sliding_window is None:
        return xp.zeros_like(lengths), hi
    # The first query (position hi - num_queries) reaches back furthest.
    return xp.maximum(hi - num_queries - sliding_window + 1, 0), hi


def soft_cap(s, logits_soft_cap: float | None):
    """``c * tanh(s / c)``, or ``s`` unchanged when ``c`` is None."""
    if logits_soft_cap is None:
        return s
    return logits_soft_cap * jnp.tanh(s / logits_soft_cap)


def flops(batch: int, num_queries: int, num_q_heads: int, context: int, head_dim: int) -> int:
    """Useful FLOPs: ``4·B·S·Hq·T·D`` (scores and ``p @ v``), every query seeing ``T`` keys."""
    return 4 * batch * num_queries * num_q_heads * context * head_dim


def bytes_accessed(batch: int, num_kv_heads: int, context: int, head_dim: int, dtype) -> int:
    """Minimum HBM traffic: each sequence's ``context`` cached k and v read once."""
    return 2 * batch * num_kv_heads * context * head_dim * jnp.dtype(dtype).itemsize
