"""Paged attention for CPU/GPU in plain XLA: one pass over the pages, online softmax.

Gather-then-dense copies the whole cache of every sequence into a dense
``[B, T, Hkv, D]`` buffer, then reads it again for the scores and once more for the
values: three passes over memory for a memory-bound op. Here a loop walks the page
table a few pages at a time; each step gathers only ``[Hkv, B, block_tokens, D]``
(small enough to stay in cache while the scores, the softmax update and ``p @ v``
use it) and folds it into a running max / denominator / accumulator, as flash
attention does. The loop runs only over the blocks that some sequence needs
(``[min lo, max hi)`` of ``common.live_range``), so short batches and sliding windows
do less work; pages outside a sequence's own range are masked, their contents never
reach the result.

Everything is computed in f32. bf16 pages are gathered as ``uint16`` bits and widened
with integer shifts rather than ``astype``: XLA:CPU converts bf16 element by element,
which made the bf16 path slower than f32 despite reading half the bytes; reinterpreted
as ``uint32`` a pair of bf16 values becomes two f32 values (the even and the odd
feature) with one shift or mask each. The even and odd halves of ``D`` are then dotted
separately. The pair view is taken of the gathered block only: taken of the pool, it
made XLA copy both whole pools on every call (B16 ctx4096 bf16 decode: 120-131 ms ->
101 ms on 2 cores).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from capibara.kernels.bit_views import to_bits
from capibara.kernels.paged_attention import common


def _widen(x, split: bool):
    """f32 parts of gathered pages: ``(even, odd)`` features of ``uint16`` bf16 bits if
    ``split``, else ``(x,)``.

    A bf16 value is the top half of the f32 of the same value. Viewed as ``uint32``, a
    pair of bf16 values becomes two f32 values (the even and the odd feature) with one
    shift or mask each; the even element is the low half of its word (XLA's bitcast is
    little-endian).
    """
    if not split:
        return (x.astype(jnp.float32),)
    pairs = jax.lax.bitcast_convert_type(x.reshape(*x.shape[:-1], -1, 2), jnp.uint32)
    even = jax.lax.bitcast_convert_type(pairs << 16, jnp.float32)
    odd = jax.lax.bitcast_convert_type(pairs & jnp.uint32(0xFFFF0000), jnp.float32)
    return even, odd


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
    pages_per_block: int = 4,
):
    """``q [B, S, Hq, D]`` against the paged cache -> ``[B, S, Hq, D]``; see ``reference``.

    Args:
      pages_per_block: pages gathered per loop step (need not divide ``pages_per_seq``:
        the table is padded with page 0, whose tokens are masked).
    """
    b, s, hq, d = q.shape
    hkv, num_pages, page_size, _ = k_pages.shape
    pages_per_seq = page_table.shape[1]
    g = hq // hkv
    ppb = min(pages_per_block, pages_per_seq)
    num_blocks = -(-pages_per_seq // ppb)
    bt = ppb * page_size

    # Unused entries may be garbage: clip into the pool (their tokens are masked). A
    # length past the table would loop past its last block (dynamic_slice then clamps
    # and rereads it as later tokens): clip it too.
    table = jnp.clip(page_table, 0, num_pages - 1)
    lengths = jnp.clip(lengths, 0, pages_per_seq * page_size)
    table = jnp.pad(table, ((0, 0), (0, num_blocks * ppb - pages_per_seq)))
    lo, hi = common.live_range(lengths, s, sliding_window)

    # [B, S, Hkv, G, D] -> [B, Hkv, S*G, D]: the G query heads sharing a kv head are
    # rows of one matrix, so k/v are read once per kv head (GQA without a repeat).
    rows = s * g
    qr = q.reshape(b, s, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, rows, d)
    # bf16 is widened as (even, odd) feature halves, everything else as one f32 part.
    split = k_pages.dtype == jnp.bfloat16 and d % 2 == 0
    q_parts = (qr[..., 0::2], qr[..., 1::2]) if split else (qr,)
    q_parts = [part.astype(jnp.float32) for part in q_parts]
    # Gather the bf16 bits as uint16 (a same-size bitcast, free). Viewing the pool as
    # uint32 pairs instead made XLA copy both whole pools on every call.
    k_pool, v_pool = (to_bits(k_pages), to_bits(v_pages)) if split else (k_pages, v_pages)
    dp = k_pool.shape[-1]
    q_pos = lengths[:, None] - s + jnp.arange(rows)[None, :] // g  # [B, rows]

    def step(i, carry):
        m, denom, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(table, i * ppb, ppb, axis=1)  # [B, ppb]
        k_parts = _widen(k_pool[:, pages].reshape(hkv, b, bt, dp), split)
        v_parts = _widen(v_pool[:, pages].reshape(hkv, b, bt, dp), split)
        k_pos = i * bt + jnp.arange(bt)
        live = (k_pos[None, :] >= lo[:, None]) & (k_pos[None, :] < hi[:, None])  # [B, bt]
        # 0 * NaN would poison p @ v: values no query sees are zeroed.
        v_parts = [jnp.where(live[None, :, :, None], v, 0.0) for v in v_parts]

        logits = sum(
            jnp.einsum("bhrd,hbtd->bhrt", qp, kp) for qp, kp in zip(q_parts, k_parts, strict=True)
        )
        logits = logits * scale
        logits = common.soft_cap(logits, logits_soft_cap)
        mask = common.visible(
            q_pos[:, :, None], k_pos[None, None, :], lengths[:, None, None], sliding_window
        )[:, None]  # [B, 1, rows, bt]
        logits = jnp.where(mask, logits, common.NEG)
        m_new = jnp.maximum(m, logits.max(axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)
        denom = alpha * denom + p.sum(axis=-1)
        pv = [jnp.einsum("bhrt,hbtd->bhrd", p, v) for v in v_parts]
        acc = alpha[..., None] * acc + jnp.concatenate(pv, axis=-1)
        return m_new, denom, acc

    # Only blocks that some sequence needs; an empty batch runs no step.
    first = jnp.min(jnp.where(hi > lo, lo, num_blocks * bt), initial=num_blocks * bt) // bt
    last = (jnp.max(hi, initial=0) + bt - 1) // bt
    m0 = jnp.full((b, hkv, rows), common.NEG, jnp.float32)
    init = (m0, jnp.zeros_like(m0), jnp.zeros((b, hkv, rows, d), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(first, jnp.maximum(first, last), step, init)
    safe = jnp.where(denom > 0, denom, 1.0)[..., None]
    out = jnp.where(denom[..., None] > 0, acc / safe, 0.0)
    if split:  # [even features | odd features] -> interleaved
        out = jnp.stack([out[..., : d // 2], out[..., d // 2 :]], axis=-1).reshape(out.shape)
    out = out.reshape(b, hkv, s, g, d).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, s, hq, d).astype(q.dtype)
