"""The fast CPU path: 2-D dots over query blocks and key chunks, in bounded memory.

XLA on CPU runs 2-D dots several times faster than batched ones, so every dot here is
2-D: a ``lax.map`` over (batch, kv head) pairs, a ``lax.scan`` over query blocks, and
``fori_loop``s over key chunks with an online softmax (f32 statistics). Memory is
O(rows · chunk) for the logits -- O(S · block) overall, never O(S · T).

Fully masked chunks are skipped, not computed then masked: for each query block the
host computes (``masks.key_range``) the chunks ``[c0, c1)`` any of its rows may see
under causal/window masking, and the loops run only over those (dynamic trip counts).
Inside that range, chunks visible to every row of the block (``[u0, u1)``) run
without the element mask; only the window's left edge, the causal diagonal and key
padding are masked (``masks.block_needs_mask``). With segment ids every chunk is masked.

GQA without repeating k/v: the ``G = Hq / Hkv`` query heads that share a kv head are
stacked as rows, ``[bq, G, D] -> [bq·G, D]``, so each step is one ``[bq·G, D] @ [D, C]``
dot against the kv head's chunk. Row ``r`` of a block is query ``a + r // G``.

Values may have their own head dim (``v [B, T, Hkv, Dv]``, e.g. MLA's qk 192 / v 128):
only the ``p·v`` and ``do·vᵀ`` products see ``Dv``.

The log-sum-exp ``lse [B·Hkv, Sp, G]`` (f32) is saved for the backward pass. Rows with
nothing to attend to get ``lse = +inf``, so ``exp(s - lse) = 0`` there without a guard.
The backward recomputes logits transposed (``[C, rows]``) so that its dk/dv products
are plain dots; a two-pass (dq, then dk/dv key-major) variant measured slower here.

bf16 inputs are computed in f32 on this path (XLA's CPU bf16 dots are slower than f32
here); the outputs are cast back to the input dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from capibara.kernels.flash_attention import masks

_F32 = jnp.float32


def _dot(a, b, contract):
    """2-D dot in f32: ``contract`` = (a's dim, b's dim)."""
    return jax.lax.dot_general(
        a, b, ((contract[:1], contract[1:]), ((), ())), preferred_element_type=_F32
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """Host-side schedule: per query block, its key chunks (numpy int32 ``[nq]`` each).

    Chunks ``[c0, c1)`` may be visible; ``[u0, u1)`` (inside) are visible to every
    row and run unmasked; ``[c0, u0)`` and ``[u1, c1)`` run masked.
    """

    c0: np.ndarray
    u0: np.ndarray
    u1: np.ndarray
    c1: np.ndarray


def plan(spec: masks.MaskSpec, block_q: int, chunk: int, segments: bool) -> Plan:
    """Builds the ``Plan`` for query blocks of ``block_q`` rows and key chunks of ``chunk``."""
    rows = []
    for a in range(0, spec.q_len, block_q):
        b = min(a + block_q, spec.q_len)
        lo, hi = masks.key_range(spec, a, b)
        if hi <= lo:  # no row of the block sees anything: zero chunks
            rows.append((0, 0, 0, 0))
            continue
        c0, c1 = lo // chunk, -(-hi // chunk)
        inner = [
            j
            for j in range(c0, c1)
            if not masks.block_needs_mask(spec, a, b, j * chunk, (j + 1) * chunk, segments=segments)
        ]
        # Unmasked chunks form one contiguous run (bounds move monotonically with rows).
        u0, u1 = (inner[0], inner[-1] + 1) if inner else (c1, c1)
        rows.append((c0, u0, u1, c1))
    c0, u0, u1, c1 = (np.asarray(c, np.int32) for c in zip(*rows, strict=True))
    return Plan(c0, u0, u1, c1)


def computed_logits(spec: masks.MaskSpec, block_q: int, chunk: int = 512) -> int:
    """Logits per query head the xla path computes: the cost estimate that shows fully
    masked chunks are skipped (compare with ``S · T``)."""
    p = plan(spec, block_q, chunk, segments=False)
    return int(block_q * chunk * (p.c1 - p.c0).sum())


def _q_groups(q, hkv, s_pad):
    """``[B, S, Hq, D] -> [B·Hkv, Sp, G, D]`` in f32, rows zero-padded to ``Sp``."""
    b, s, hq, d = q.shape
    q = jnp.pad(q, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))
    qg = q.reshape(b, s_pad, hkv, hq // hkv, d).transpose(0, 2, 1, 3, 4)
    return qg.reshape(b * hkv, s_pad, hq // hkv, d).astype(_F32)


def _kv_groups(k, t_pad):
    """``[B, T, Hkv, D] -> [B·Hkv, Tp, D]`` in f32, keys zero-padded to ``Tp``."""
    b, t, hkv, d = k.shape
    k = jnp.pad(k, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    return k.transpose(0, 2, 1, 3).reshape(b * hkv, t_pad, d).astype(_F32)


def lse_from_groups(lse, b, hkv, s):
    """``lse [B·Hkv, Sp, G] -> [B, S, Hq]`` (the public layout)."""
    g = lse.shape[2]
    return lse[:, :s].reshape(b, hkv, s, g).transpose(0, 2, 1, 3).reshape(b, s, hkv * g)


def _lse_to_groups(x, hkv, s_pad):
    """``[B, S, Hq] -> [B·Hkv, Sp, G]`` (f32), rows zero-padded: ``lse_from_groups``'s
    inverse, for the lse cotangent."""
    return _q_groups(x[..., None], hkv, s_pad)[..., 0]


def _from_groups(x, b, hkv, s):
    """``[B·Hkv, Sp, G, D] -> [B, S, Hq, D]``."""
    _, _, g, d = x.shape
    x = x[:, :s]
    return x.reshape(b, hkv, s, g, d).transpose(0, 2, 1, 3, 4).reshape(b, s, hkv * g, d)


def _segments(q_seg, kv_seg, hkv, s_pad, t_pad):
    """Per (batch, kv head) segment ids, padded (padding is masked by position anyway)."""
    if q_seg is None:
        return None, None
    qs = jnp.pad(q_seg, ((0, 0), (0, s_pad - q_seg.shape[1])))
    ks = jnp.pad(kv_seg, ((0, 0), (0, t_pad - kv_seg.shape[1])))
    return jnp.repeat(qs, hkv, axis=0), jnp.repeat(ks, hkv, axis=0)


@dataclasses.dataclass(frozen=True)
class _Block:
    """What one query block's chunk steps share (traced values, built per block)."""

    spec: masks.MaskSpec
    cap: float | None
    chunk: int
    q: jax.Array  # [rows, D], pre-scaled
    q_pos: jax.Array  # [rows, 1] query row of each stacked row
    q_seg: jax.Array | None  # [rows, 1]
    k: jax.Array  # [Tp, D] of the kv head
    v: jax.Array
    k_seg: jax.Array | None  # [Tp]

    def logits(self, j, masked: bool):
        """Capped logits ``[rows, C]`` of chunk ``j``, their masked copy, and the chunk."""
        kc = jax.lax.dynamic_slice_in_dim(self.k, j * self.chunk, self.chunk)
        vc = jax.lax.dynamic_slice_in_dim(self.v, j * self.chunk, self.chunk)
        s = masks.soft_cap(_dot(self.q, kc, (1, 1)), self.cap)  # "rd,cd->rc"
        if not masked:
            return s, s, kc, vc
        k_pos = j * self.chunk + jnp.arange(self.chunk, dtype=jnp.int32)[None, :]
        if self.q_seg is None:
            keep = masks.visible(self.spec, self.q_pos, k_pos)
        else:
            kseg = jax.lax.dynamic_slice_in_dim(self.k_seg, j * self.chunk, self.chunk)
            keep = masks.visible(self.spec, self.q_pos, k_pos, self.q_seg, kseg[None, :])
        return s, jnp.where(keep, s, masks.MASK_VALUE), kc, vc

    def logits_t(self, j, masked: bool):
        """Like ``logits``, transposed: ``[C, rows]`` (the backward's dk/dv dots are then
        plain ``[C, rows] @ [rows, D]`` products, no transposed operand)."""
        kc = jax.lax.dynamic_slice_in_dim(self.k, j * self.chunk, self.chunk)
        vc = jax.lax.dynamic_slice_in_dim(self.v, j * self.chunk, self.chunk)
        s = masks.soft_cap(_dot(kc, self.q, (1, 1)), self.cap)  # "cd,rd->cr"
        if not masked:
            return s, s, kc, vc
        k_pos = j * self.chunk + jnp.arange(self.chunk, dtype=jnp.int32)[:, None]
        q_pos = self.q_pos.T
        if self.q_seg is None:
            keep = masks.visible(self.spec, q_pos, k_pos)
        else:
            kseg = jax.lax.dynamic_slice_in_dim(self.k_seg, j * self.chunk, self.chunk)
            keep = masks.visible(self.spec, q_pos, k_pos, self.q_seg.T, kseg[:, None])
        return s, jnp.where(keep, s, masks.MASK_VALUE), kc, vc


def _scan_xs(p: Plan):
    """Scan inputs: ``(block index, (c0, u0, u1, c1))`` per query block."""
    return jnp.arange(len(p.c0), dtype=jnp.int32), tuple(map(jnp.asarray, (p.c0, p.u0, p.u1, p.c1)))


def _chunk_loops(bounds, body, carry):
    """Runs ``body(j, carry, masked)`` over a block's chunks: masked, unmasked, masked."""
    c0, u0, u1, c1 = bounds
    carry = jax.lax.fori_loop(c0, u0, lambda j, c: body(j, c, True), carry)
    carry = jax.lax.fori_loop(u0, u1, lambda j, c: body(j, c, False), carry)
    return jax.lax.fori_loop(u1, c1, lambda j, c: body(j, c, True), carry)


def _block_inputs(qh, qs, i, block_q, g, d):
    rows = block_q * g
    qb = jax.lax.dynamic_slice_in_dim(qh, i * block_q, block_q).reshape(rows, d)
    q_pos = i * block_q + jnp.arange(rows, dtype=jnp.int32)[:, None] // g
    q_seg = None
    if qs is not None:
        q_seg = jnp.repeat(jax.lax.dynamic_slice_in_dim(qs, i * block_q, block_q), g)[:, None]
    return qb, q_pos, q_seg


def _sizes(q, k, block_q, chunk):
    s, t = q.shape[1], k.shape[1]
    return -(-s // block_q) * block_q, -(-t // chunk) * chunk


def forward(
    q, k, v, q_seg, kv_seg, *, spec: masks.MaskSpec, scale: float, cap, block_q: int, chunk: int
):
    """Attention forward.

    Args:
      q: ``[B, S, Hq, D]``; k: ``[B, T, Hkv, D]``; v: ``[B, T, Hkv, Dv]``;
        q_seg ``[B, S]``/kv_seg ``[B, T]`` int32 or both ``None``.
      spec, scale, cap: mask structure, logit scale, soft-cap (or ``None``).
      block_q: query positions per block (rows per dot = ``block_q · G``).
      chunk: keys per step.

    Returns:
      ``(out [B, S, Hq, Dv] in q.dtype, lse [B·Hkv, Sp, G] f32)``.
    """
    bsz, s_len, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    g = hq // hkv
    s_pad, t_pad = _sizes(q, k, block_q, chunk)
    # Scale once on [S, D] rather than on every [S, T] logit.
    qg = _q_groups(q, hkv, s_pad) * scale
    kg, vg = _kv_groups(k, t_pad), _kv_groups(v, t_pad)
    qsg, ksg = _segments(q_seg, kv_seg, hkv, s_pad, t_pad)
    p = plan(spec, block_q, chunk, q_seg is not None)
    rows = block_q * g

    def one_head(xs):
        qh, kh, vh, qs, ks = xs  # [Sp, G, D], [Tp, D], [Tp, D], [Sp], [Tp]

        def q_block(_, xs):
            i, bounds = xs
            qb, q_pos, q_seg_b = _block_inputs(qh, qs, i, block_q, g, d)
            blk = _Block(spec, cap, chunk, qb, q_pos, q_seg_b, kh, vh, ks)

            def step(j, carry, masked):
                m, denom, acc = carry  # [rows, 1], [rows, 1], [rows, Dv]
                _, s, _, vc = blk.logits(j, masked)
                m_next = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
                # Rows that have seen only -inf so far shift by 0: exp(-inf) = 0, no NaN.
                m_safe = jnp.where(m_next == masks.MASK_VALUE, 0.0, m_next)
                alpha = jnp.exp(m - m_safe)
                pr = jnp.exp(s - m_safe)
                denom = alpha * denom + jnp.sum(pr, axis=1, keepdims=True)
                acc = alpha * acc + _dot(pr, vc, (1, 0))  # "rc,cd->rd"
                return m_next, denom, acc

            init = (
                jnp.full((rows, 1), masks.MASK_VALUE, _F32),
                jnp.zeros((rows, 1), _F32),
                jnp.zeros((rows, dv), _F32),
            )
            m, denom, acc = _chunk_loops(bounds, step, init)
            empty = denom == 0.0  # the row saw no key: output 0, lse +inf (so bwd p = 0)
            out = acc / jnp.where(empty, 1.0, denom)
            lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, denom)))
            return None, (out.reshape(block_q, g, dv), lse.reshape(block_q, g))

        _, (out, lse) = jax.lax.scan(q_block, None, _scan_xs(p))
        return out.reshape(s_pad, g, dv), lse.reshape(s_pad, g)

    out, lse = jax.lax.map(one_head, (qg, kg, vg, qsg, ksg))
    return _from_groups(out, bsz, hkv, s_len).astype(q.dtype), lse


def backward(
    q,
    k,
    v,
    q_seg,
    kv_seg,
    out,
    lse,
    dout,
    dlse=None,
    *,
    spec,
    scale: float,
    cap,
    block_q: int,
    chunk: int,
):
    """Gradients ``(dq, dk, dv)`` from the saved ``lse`` (no [S, T] matrix is kept).

    Per step: ``p = exp(s - lse)``, ``dv += pᵀ·do``, ``ds = p ∘ (do·vᵀ - δ)`` with
    ``δ = rowsum(do ∘ o) - dlse`` (``∂lse/∂s = p``: the lse cotangent ``dlse [B, S, Hq]``,
    if any, enters only through δ), then through the soft-cap, ``dq += ds·k``,
    ``dk += dsᵀ·q`` (both times ``scale``). dk, dv of a kv head sum over its ``G`` query
    heads for free: those are rows of the same dot.
    """
    bsz, s_len, hq, d = q.shape
    t_len, hkv, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    s_pad, t_pad = _sizes(q, k, block_q, chunk)
    qg = _q_groups(q, hkv, s_pad) * scale
    kg, vg = _kv_groups(k, t_pad), _kv_groups(v, t_pad)
    dog = _q_groups(dout, hkv, s_pad)
    delta = jnp.sum(dog * _q_groups(out, hkv, s_pad), axis=-1)  # [B·Hkv, Sp, G]
    if dlse is not None:
        delta = delta - _lse_to_groups(dlse, hkv, s_pad)
    qsg, ksg = _segments(q_seg, kv_seg, hkv, s_pad, t_pad)
    p = plan(spec, block_q, chunk, q_seg is not None)
    rows = block_q * g

    def one_head(xs):
        qh, kh, vh, qs, ks, doh, lh, dh = xs

        def q_block(dkv, xs):
            i, bounds = xs
            qb, q_pos, q_seg_b = _block_inputs(qh, qs, i, block_q, g, d)
            blk = _Block(spec, cap, chunk, qb, q_pos, q_seg_b, kh, vh, ks)
            dob = jax.lax.dynamic_slice_in_dim(doh, i * block_q, block_q).reshape(rows, dv_dim)
            # Row vectors [1, rows]: the backward works on transposed logits [C, rows].
            lse_b = jax.lax.dynamic_slice_in_dim(lh, i * block_q, block_q).reshape(1, rows)
            delta_b = jax.lax.dynamic_slice_in_dim(dh, i * block_q, block_q).reshape(1, rows)

            def step(j, carry, masked):
                dq, dk, dv = carry
                s, s_masked, kc, vc = blk.logits_t(j, masked)  # [C, rows]
                pr = jnp.exp(s_masked - lse_b)
                dp = _dot(vc, dob, (1, 1))  # "cd,rd->cr"
                ds = masks.soft_cap_grad(pr * (dp - delta_b), s, cap)
                dq = dq + _dot(ds, kc, (0, 0))  # "cr,cd->rd"
                at = j * chunk
                dv_c = jax.lax.dynamic_slice_in_dim(dv, at, chunk) + _dot(pr, dob, (1, 0))
                dk_c = jax.lax.dynamic_slice_in_dim(dk, at, chunk) + _dot(ds, qb, (1, 0))
                dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_c, at, 0)  # "cr,rd->cd"
                dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_c, at, 0)  # qb carries scale
                return dq, dk, dv

            dq, dk, dv = _chunk_loops(bounds, step, (jnp.zeros((rows, d), _F32), *dkv))
            return (dk, dv), (dq * scale).reshape(block_q, g, d)

        zeros = (jnp.zeros((t_pad, d), _F32), jnp.zeros((t_pad, dv_dim), _F32))
        (dk, dv), dq = jax.lax.scan(q_block, zeros, _scan_xs(p))
        return dq.reshape(s_pad, g, d), dk, dv

    dq, dk, dv = jax.lax.map(one_head, (qg, kg, vg, qsg, ksg, dog, lse, delta))
    dq = _from_groups(dq, bsz, hkv, s_len).astype(q.dtype)
    dk = dk[:, :t_len].reshape(bsz, hkv, t_len, d).transpose(0, 2, 1, 3).astype(k.dtype)
    dv = dv[:, :t_len].reshape(bsz, hkv, t_len, dv_dim).transpose(0, 2, 1, 3).astype(v.dtype)
    return dq, dk, dv
