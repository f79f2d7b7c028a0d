"""Paged attention the obvious way: gather every page of every sequence, then dense
attention with an explicit mask. The test oracle (f32, ``Precision.HIGHEST``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from capibara.kernels.paged_attention import common


def paged_attention(
    q,
    k_pages,
    v_pages,
    lengths,
    page_table,
    *,
    scale: float,
    logits_soft_cap: float | None = None,
    sliding_window: int | None = None,
):
    """``q [B, S, Hq, D]`` against the paged cache -> ``[B, S, Hq, D]`` in ``q.dtype``.

    Args:
      q: the last ``S`` tokens of each sequence (see ``common`` for positions).
      k_pages, v_pages: ``[Hkv, P, page_size, D]`` page pools.
      lengths: ``int32[B]`` cached tokens per sequence (the ``S`` new ones included).
      page_table: ``int32[B, pages_per_seq]``; entry ``[b, j]`` is the pool page that
        holds tokens ``j * page_size ..`` of sequence ``b``. Entries past the length
        are never used (clipped into range so that garbage cannot index out of bounds).
    """
    b, s, hq, d = q.shape
    hkv, num_pages, page_size, _ = k_pages.shape
    pages_per_seq = page_table.shape[1]
    t = pages_per_seq * page_size
    # Out-of-range values are clipped (the public op checks them): no read outside
    # the pools, whatever the table or the lengths hold.
    table = jnp.clip(page_table, 0, num_pages - 1)
    lengths = jnp.clip(lengths, 0, t)
    # [Hkv, B, pages_per_seq, page_size, D] -> [B, Hkv, T, D]
    k = k_pages[:, table].reshape(hkv, b, t, d).transpose(1, 0, 2, 3).astype(jnp.float32)
    v = v_pages[:, table].reshape(hkv, b, t, d).transpose(1, 0, 2, 3).astype(jnp.float32)

    q_pos = lengths[:, None] - s + jnp.arange(s)[None, :]  # [B, S]
    k_pos = jnp.arange(t)[None, None, :]  # explicit ranks: rank_promotion="raise" holds
    mask = common.visible(q_pos[:, :, None], k_pos, lengths[:, None, None], sliding_window)
    # Keys no query sees may hold anything (NaN in never-written slots): zero them so
    # that 0 * NaN cannot reach the output.
    live = mask.any(axis=1)[:, None, :, None]  # [B, 1, T, 1]
    k, v = jnp.where(live, k, 0.0), jnp.where(live, v, 0.0)

    qg = q.reshape(b, s, hkv, hq // hkv, d).astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("bshgd,bhtd->bhgst", qg, k, precision=hi) * scale
    logits = common.soft_cap(logits, logits_soft_cap)
    mask = mask[:, None, None]  # [B, 1, 1, S, T]
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    out = jnp.einsum("bhgst,bhtd->bshgd", p / jnp.where(denom > 0, denom, 1.0), v, precision=hi)
    return out.reshape(b, s, hq, d).astype(q.dtype)
