"""Paged attention as a Mosaic TPU Pallas kernel.

Grid ``(B, Hkv, num_blocks)``: one step folds ``pages_per_block`` pages of one
sequence and one kv head into a running (max, denominator, accumulator) held in VMEM
scratch -- flash attention over the pages, the ``[S*G, D]`` query rows of the G
query heads sharing the kv head (times the ``S`` query tokens) resident throughout.

The page table and the lengths reach the kernel by scalar prefetch. Each page slot of
a block is its own input (``k_pages`` and ``v_pages`` passed ``pages_per_block``
times), whose index map looks the page up in the table, so the Pallas pipeline
fetches exactly the pages the block needs, one DMA per page, double-buffered.

Pages outside a sequence's live range ``[lo, hi)`` (``common.live_range``) are never
fetched: the index maps clamp the block index into the live blocks, so a skipped step
asks for the same pages as its neighbour and the pipeline issues no new DMA, while
``pl.when`` skips its compute. Within the last (or first) live block, a slot past the
range keeps the page it held one block earlier (or prefetches the page it will hold
one block later) for the same reason; its tokens are masked by their *logical*
position, so what the slot holds never matters. Table entries are clipped into
``[0, P)`` first: garbage in unused entries cannot index out of bounds. Every page of
the live range is fetched exactly once (``test_pallas_fetches_only_live_pages_once``
replays the pipeline's rule); the pipeline must fill every slot at a sequence's first
step, so a sequence shorter than one block fills its spare slots with its last page,
and an empty one with the page its first table entry (clipped) names.

All ``S*G`` query rows of a (sequence, kv head) stay resident in VMEM with their f32
accumulator and a ``[rows, block_tokens]`` logits tile: sized for decode, speculative
verification and prefill chunks of up to a few hundred tokens, not whole prompts
(``capibara.kernels.flash_attention`` tiles the queries).

On TPU, ``page_size`` should be a multiple of the sublane tile (8 for f32, 16 for
bf16) so the pages of a block concatenate without relayout; checked here only by
lowering (``lowering_cases``), not on hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from capibara.kernels import _platform
from capibara.kernels.paged_attention import common

_LANES = 128  # m and l are kept lane-replicated: [rows, 128], the native f32 tile


def _live_blocks(length, *, num_queries, sliding_window, block_tokens, page_size):
    """Scalar ``(lo, hi, first_page, last_page, first_block, last_block)`` of a sequence.

    For an empty range (``length == 0``) ``last_block < first_block``; the page indices
    stay valid (0) so the index maps still point into the table.
    """
    if sliding_window is None:
        lo = jnp.int32(0)
    else:
        lo = jnp.maximum(length - num_queries - sliding_window + 1, 0)
    hi = length
    # lax.div (truncating) on these non-negative values: jnp's floor division lowers
    # through `sign`, which Mosaic can't lower without knowing the TPU generation.
    div = jax.lax.div
    first_page = div(lo, page_size)
    last_page = jnp.maximum(div(hi + page_size - 1, page_size) - 1, first_page)
    first_block = div(lo, block_tokens)
    last_block = div(hi + block_tokens - 1, block_tokens) - 1
    return lo, hi, first_page, last_page, first_block, last_block


def logical_page(
    i, slot, length, *, pages_per_block, page_size, pages_per_seq, num_queries, sliding_window
):
    """Which page of the sequence (``page_table`` column) page slot ``slot`` holds at step ``i``.

    Always a live page (``[first_page, last_page]``), so the table entry read is one the
    caller filled in. Steps outside the live blocks repeat a live block's pages, so the
    pipeline sees an unchanged block index and issues no DMA.
    """
    _, _, first_page, last_page, first_block, last_block = _live_blocks(
        length,
        num_queries=num_queries,
        sliding_window=sliding_window,
        block_tokens=pages_per_block * page_size,
        page_size=page_size,
    )
    block = jnp.clip(i, first_block, jnp.maximum(last_block, first_block))
    j = block * pages_per_block + slot
    # A slot past the range keeps the page it held one block earlier (no new DMA); a
    # slot before it fetches the page it will hold one block later (a prefetch).
    j = jnp.where(j > last_page, j - pages_per_block, j)
    j = jnp.where(j < first_page, j + pages_per_block, j)
    return jnp.minimum(jnp.clip(j, first_page, last_page), pages_per_seq - 1)


def _paged_attention_kernel(
    lengths_ref,
    table_ref,
    q_ref,
    q_offset_ref,
    *refs,
    pages_per_block: int,
    page_size: int,
    num_queries: int,
    scale: float,
    logits_soft_cap: float | None,
    sliding_window: int | None,
):
    """One (sequence, kv head, block of pages) step of online-softmax attention."""
    del table_ref  # used by the index maps only
    k_refs = refs[:pages_per_block]
    v_refs = refs[pages_per_block : 2 * pages_per_block]
    o_ref, m_ref, l_ref, acc_ref = refs[2 * pages_per_block :]
    b, i = pl.program_id(0), pl.program_id(2)
    block_tokens = pages_per_block * page_size
    length = lengths_ref[b]
    lo, hi, _, _, first_block, last_block = _live_blocks(
        length,
        num_queries=num_queries,
        sliding_window=sliding_window,
        block_tokens=block_tokens,
        page_size=page_size,
    )

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, common.NEG)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((i >= first_block) & (i <= last_block))
    def _fold_block():
        rows = q_ref.shape[0]
        k = jnp.concatenate([r[...] for r in k_refs], axis=0)  # [block_tokens, D]
        v = jnp.concatenate([r[...] for r in v_refs], axis=0)
        # Logical token positions: a slot holding a neighbour's page is masked here.
        v_pos = i * block_tokens + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
        v = jnp.where((v_pos >= lo) & (v_pos < hi), v, jnp.zeros_like(v))

        logits = jax.lax.dot_general(
            q_ref[...], k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )  # [rows, block_tokens]
        logits = common.soft_cap(logits * scale, logits_soft_cap)
        k_pos = i * block_tokens + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        q_pos = length + q_offset_ref[...]
        mask = common.visible(q_pos, k_pos, length, sliding_window)
        logits = jnp.where(mask, logits, common.NEG)

        m_prev = jnp.max(m_ref[...], axis=1, keepdims=True)  # lanes hold copies
        m_new = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))  # [rows, 1]
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(mask, jnp.exp(logits - m_new), 0.0)
        l_new = alpha * jnp.max(l_ref[...], axis=1, keepdims=True) + p.sum(axis=1, keepdims=True)
        pv = jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )  # [rows, D]
        acc_ref[...] = alpha * acc_ref[...] + pv
        m_ref[...] = jnp.broadcast_to(m_new, (rows, _LANES))
        l_ref[...] = jnp.broadcast_to(l_new, (rows, _LANES))

    @pl.when(i == pl.num_programs(2) - 1)
    def _store():
        denom = jnp.max(l_ref[...], axis=1, keepdims=True)
        # A row that saw no key (length 0, a query before position 0) has denom == 0.
        out = acc_ref[...] / jnp.where(denom > 0, denom, 1.0)
        o_ref[...] = jnp.where(denom > 0, out, 0.0).astype(o_ref.dtype)


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
    pages_per_block: int = 8,
    interpret: bool = False,
):
    """``q [B, S, Hq, D]`` against the paged cache -> ``[B, S, Hq, D]``; see ``reference``.

    Args:
      pages_per_block: pages folded per grid step (clamped to ``pages_per_seq``).
      interpret: run in the Pallas TPU interpreter (any backend).
    """
    b, s, hq, d = q.shape
    hkv, num_pages, page_size, _ = k_pages.shape
    pages_per_seq = page_table.shape[1]
    g = hq // hkv
    ppb = min(pages_per_block, pages_per_seq)
    num_blocks = -(-pages_per_seq // ppb)
    block_tokens = ppb * page_size

    # [B, S, Hkv, G, D] -> [B, Hkv, rows, D], rows padded to the sublane tile (8 rows
    # of 32-bit values, 16 of bf16).
    rows = s * g
    sublanes = 8 * max(1, 4 // q.dtype.itemsize)
    rows_p = -(-rows // sublanes) * sublanes
    qr = q.reshape(b, s, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, rows, d)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rows_p - rows), (0, 0)))
    table = jnp.clip(page_table, 0, num_pages - 1).astype(jnp.int32).reshape(-1)
    lengths = jnp.clip(lengths, 0, pages_per_seq * page_size)  # as every implementation
    # Query row r is query r // G, at position length + r // G - S. Mosaic has no vector
    # integer division, so the offsets come in as a constant block shaped like the
    # logits (fetched once). Padded rows get a position before 0: they see nothing.
    row = np.arange(rows_p)
    q_offset = np.where(row < rows, row // g - s, -(2**30)).astype(np.int32)
    q_offset = jnp.asarray(np.broadcast_to(q_offset[:, None], (rows_p, block_tokens)))
    static = {
        "pages_per_block": ppb,
        "page_size": page_size,
        "pages_per_seq": pages_per_seq,
        "num_queries": s,
        "sliding_window": sliding_window,
    }

    def page_slot(slot):
        def index_map(bi, h, i, lengths_ref, table_ref):  # pool page held by `slot`
            j = logical_page(i, slot, lengths_ref[bi], **static)
            return h, table_ref[bi * pages_per_seq + j], 0, 0

        return pl.BlockSpec((None, None, page_size, d), index_map)

    def q_rows(bi, h, i, lengths_ref, table_ref):  # the query rows of (sequence, kv head)
        return bi, h, 0, 0

    def whole(bi, h, i, lengths_ref, table_ref):  # the one block of q_offset
        return 0, 0

    page_specs = [page_slot(slot) for slot in range(ppb)]
    row_spec = pl.BlockSpec((None, None, rows_p, d), q_rows)
    offset_spec = pl.BlockSpec((rows_p, block_tokens), whole)
    capacity = pages_per_seq * page_size
    out = _platform.pallas_call(
        functools.partial(
            _paged_attention_kernel,
            pages_per_block=ppb,
            page_size=page_size,
            num_queries=s,
            scale=scale,
            logits_soft_cap=logits_soft_cap,
            sliding_window=sliding_window,
        ),
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows_p, d), q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hkv, num_blocks),
            in_specs=[row_spec, offset_spec, *page_specs, *page_specs],
            out_specs=row_spec,
            scratch_shapes=[
                pltpu.VMEM((rows_p, _LANES), jnp.float32),  # running max m
                pltpu.VMEM((rows_p, _LANES), jnp.float32),  # running denominator l
                pltpu.VMEM((rows_p, d), jnp.float32),  # running numerator
            ],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            # Upper bound: every table entry live (the lengths are values, not shapes).
            flops=common.flops(b, s, hq, capacity, d),
            transcendentals=b * s * hq * capacity,
            bytes_accessed=common.bytes_accessed(b, hkv, capacity, d, k_pages.dtype)
            + 2 * q.size * q.dtype.itemsize,
        ),
        interpret=_platform.interpret_params(interpret),
    )(lengths.astype(jnp.int32), table, qr, q_offset, *([k_pages] * ppb), *([v_pages] * ppb))
    out = out[:, :, :rows].reshape(b, hkv, s, g, d).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, s, hq, d)
