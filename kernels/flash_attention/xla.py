"""The fast CPU path: q-block triangles of 2-D dots, with key ranges fixed on the host.

XLA on CPU runs 2-D dots several times faster than batched ones, so the work is a
``lax.scan`` over (batch, kv head) pairs whose body is a static Python loop over query
blocks. For query block ``[a, b)`` the host computes (``masks.key_range``) the only
keys any of its rows may see under causal/window masking; keys outside are never
multiplied -- a fully masked block costs nothing, and a block that is fully visible
runs without an element mask (``masks.block_needs_mask``).

GQA without repeating k/v: the ``G = Hq / Hkv`` query heads that share a kv head are
stacked as rows, ``[bq, G, D] -> [bq·G, D]``, so each block is one ``[bq·G, D] @ [D, n]``
dot against the kv head's keys. Row ``r`` of a block is query ``a + r // G``.

Within a block the softmax is exact over the block's key range (no online rescaling:
one pass over ``n <= T`` keys), in f32. Memory is O(bq·G·T) per block -- O(S·block),
never the O(S·T) of materialized scores.

The log-sum-exp ``lse [B·Hkv, S, G]`` (f32) is saved for the backward pass. Rows with
nothing to attend to get ``lse = +inf``, so ``exp(s - lse) = 0`` there without a guard.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.flash_attention import masks

_F32 = jnp.float32


def _dot(a, b, contract):
    """2-D dot in f32: ``contract`` = (a's dim, b's dim)."""
    return jax.lax.dot_general(
        a, b, ((contract[:1], contract[1:]), ((), ())), preferred_element_type=_F32
    )


# An unmasked middle narrower than this is folded into a masked piece: a separate
# tiny dot costs more than masking its few columns.
MIN_UNMASKED = 128


def _pieces(spec: masks.MaskSpec, a: int, b: int, segments: bool):
    """Key pieces ``(k0, k1, masked)`` of query rows ``[a, b)``, in key order.

    Keys outside ``masks.key_range`` are skipped. Of the rest, ``[lo_in, hi_in)`` is
    visible to *every* row (the last row's lower bound, the first row's upper bound:
    both bounds only grow with the row), so it runs without the element mask; only
    the window's left edge and the causal diagonal are masked pieces.
    """
    lo, hi = masks.key_range(spec, a, b)
    if hi <= lo:
        return []
    if segments:
        return [(lo, hi, True)]
    lo_in = max(lo, masks.key_range(spec, b - 1, b)[0])
    hi_in = min(hi, masks.key_range(spec, a, a + 1)[1])
    if hi_in - lo_in < MIN_UNMASKED:
        return [(lo, hi, masks.block_needs_mask(spec, a, b, lo, hi, segments=False))]
    pieces = [(lo, lo_in, True), (lo_in, hi_in, False), (hi_in, hi, True)]
    return [p for p in pieces if p[1] > p[0]]


def _blocks(spec: masks.MaskSpec, block_q: int, segments: bool = False):
    """Host-side schedule: ``(a, b, pieces)`` per query block ``[a, b)``."""
    out = []
    for a in range(0, spec.q_len, block_q):
        b = min(a + block_q, spec.q_len)
        out.append((a, b, _pieces(spec, a, b, segments)))
    return out


def computed_logits(spec: masks.MaskSpec, block_q: int) -> int:
    """Number of logits per (query head) the xla path computes: the cost estimate that
    shows fully masked blocks are skipped (compare with ``S · T``)."""
    return sum(
        (b - a) * (k1 - k0) for a, b, pieces in _blocks(spec, block_q) for k0, k1, _ in pieces
    )


def _logits(qb, kb, spec, a, g, lo, hi, qs, ks, cap, needs_mask):
    """Capped logits ``[rows, n]`` of one block and its masked copy (-inf where hidden)."""
    s = masks.soft_cap(_dot(qb, kb, (1, 1)), cap)  # "rd,nd->rn"
    if not needs_mask:
        return s, s
    rows, n = s.shape
    q_pos = a + jnp.arange(rows, dtype=jnp.int32)[:, None] // g
    k_pos = lo + jnp.arange(n, dtype=jnp.int32)[None, :]
    if qs is None:
        keep = masks.visible(spec, q_pos, k_pos)
    else:
        q_seg = jnp.repeat(qs[a : a + rows // g], g)[:, None]
        keep = masks.visible(spec, q_pos, k_pos, q_seg, ks[lo:hi][None, :])
    return s, jnp.where(keep, s, masks.MASK_VALUE)


def _q_groups(q, hkv):
    """``[B, S, Hq, D] -> [B·Hkv, S, G, D]`` in f32."""
    b, s, hq, d = q.shape
    qg = q.reshape(b, s, hkv, hq // hkv, d).transpose(0, 2, 1, 3, 4)
    return qg.reshape(b * hkv, s, hq // hkv, d).astype(_F32)


def _kv_groups(k):
    """``[B, T, Hkv, D] -> [B·Hkv, T, D]`` in f32."""
    b, t, hkv, d = k.shape
    return k.transpose(0, 2, 1, 3).reshape(b * hkv, t, d).astype(_F32)


def _from_groups(x, b, hkv):
    """``[B·Hkv, S, G, D] -> [B, S, Hq, D]``."""
    _, s, g, d = x.shape
    return x.reshape(b, hkv, s, g, d).transpose(0, 2, 1, 3, 4).reshape(b, s, hkv * g, d)


def _segments(q_seg, kv_seg, hkv):
    if q_seg is None:
        return None, None
    return jnp.repeat(q_seg, hkv, axis=0), jnp.repeat(kv_seg, hkv, axis=0)


def forward(q, k, v, q_seg, kv_seg, *, spec: masks.MaskSpec, scale: float, cap, block_q: int):
    """Attention forward.

    Args:
      q: ``[B, S, Hq, D]``; k, v: ``[B, T, Hkv, D]``; q_seg ``[B, S]``/kv_seg ``[B, T]``
        int32 or both ``None``.
      spec, scale, cap: mask structure, logit scale, soft-cap (or ``None``).
      block_q: query positions per block (rows per dot = ``block_q · G``).

    Returns:
      ``(out [B, S, Hq, D] in q.dtype, lse [B·Hkv, S, G] f32)``.
    """
    bsz, s_len, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg, kg, vg = _q_groups(q, hkv), _kv_groups(k), _kv_groups(v)
    qg = qg * scale  # scale once on [S, D] rather than on every [S, T] logit
    qsg, ksg = _segments(q_seg, kv_seg, hkv)
    segmented = q_seg is not None
    schedule = _blocks(spec, block_q, segmented)

    def one_head(xs):
        qh, kh, vh, qs, ks = xs  # [S, G, D], [T, D], [T, D], [S], [T]
        outs, lses = [], []
        for a, b, pieces in schedule:
            rows = (b - a) * g
            if not pieces:  # every row of the block is fully masked: nothing computed
                outs.append(jnp.zeros((rows, d), _F32))
                lses.append(jnp.full((rows,), jnp.inf, _F32))
                continue
            qb = qh[a:b].reshape(rows, d)
            logits = [
                _logits(qb, kh[k0:k1], spec, a, g, k0, k1, qs, ks, cap, masked)[1]
                for k0, k1, masked in pieces
            ]
            m = functools.reduce(jnp.maximum, [jnp.max(s, axis=1, keepdims=True) for s in logits])
            if any(masked for *_, masked in pieces):
                # A row may be all -inf: shift by 0 so exp gives 0, not NaN.
                m = jnp.where(m == masks.MASK_VALUE, 0.0, m)
            denom, o = 0.0, 0.0
            for s, (k0, k1, _) in zip(logits, pieces, strict=True):
                p = jnp.exp(s - m)
                denom = denom + jnp.sum(p, axis=1, keepdims=True)
                o = o + _dot(p, vh[k0:k1], (1, 0))  # "rn,nd->rd"
            # Normalize the [rows, D] output, not the [rows, n] probabilities.
            outs.append(o / jnp.where(denom == 0.0, 1.0, denom))
            lses.append(jnp.where(denom == 0.0, jnp.inf, m + jnp.log(denom))[:, 0])
        out = jnp.concatenate(outs, axis=0).reshape(s_len, g, d)
        lse = jnp.concatenate(lses, axis=0).reshape(s_len, g)
        return out, lse

    out, lse = jax.lax.map(one_head, (qg, kg, vg, qsg, ksg))
    return _from_groups(out, bsz, hkv).astype(q.dtype), lse


def backward(q, k, v, q_seg, kv_seg, out, lse, dout, *, spec, scale: float, cap, block_q: int):
    """Gradients ``(dq, dk, dv)`` from the saved ``lse`` (no [S, T] matrix is kept).

    Per block: ``p = exp(s - lse)``, ``dv += pᵀ·do``, ``ds = p ∘ (do·vᵀ - δ)`` with
    ``δ = rowsum(do ∘ o)``, then through the soft-cap, ``dq = ds·k``, ``dk += dsᵀ·q``
    (both times ``scale``). dk, dv of a kv head sum over its ``G`` query heads for free:
    those are rows of the same dot.
    """
    bsz, s_len, hq, d = q.shape
    t_len, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    qg, kg, vg = _q_groups(q, hkv) * scale, _kv_groups(k), _kv_groups(v)
    dog = _q_groups(dout, hkv)
    delta = jnp.sum(dog * _q_groups(out, hkv), axis=-1)  # [B·Hkv, S, G]
    qsg, ksg = _segments(q_seg, kv_seg, hkv)
    segmented = q_seg is not None
    schedule = _blocks(spec, block_q, segmented)

    def one_head(xs):
        qh, kh, vh, qs, ks, doh, lh, dh = xs
        dqs = []
        dk = jnp.zeros((t_len, d), _F32)
        dv = jnp.zeros((t_len, d), _F32)
        for a, b, pieces in schedule:
            rows = (b - a) * g
            qb = qh[a:b].reshape(rows, d)
            dob = doh[a:b].reshape(rows, d)
            dq = jnp.zeros((rows, d), _F32)
            for k0, k1, masked in pieces:  # independent given lse: no rescaling
                s, s_masked = _logits(qb, kh[k0:k1], spec, a, g, k0, k1, qs, ks, cap, masked)
                p = jnp.exp(s_masked - lh[a:b].reshape(rows, 1))
                dv = dv.at[k0:k1].add(_dot(p, dob, (0, 0)))  # "rn,rd->nd"
                dp = _dot(dob, vh[k0:k1], (1, 1))  # "rd,nd->rn"
                ds = masks.soft_cap_grad(p * (dp - dh[a:b].reshape(rows, 1)), s, cap)
                dq = dq + _dot(ds, kh[k0:k1], (1, 0))  # "rn,nd->rd"
                dk = dk.at[k0:k1].add(_dot(ds, qb, (0, 0)))  # "rn,rd->nd" (qb carries scale)
            dqs.append(dq * scale)
        dq = jnp.concatenate(dqs, axis=0).reshape(s_len, g, d)
        return dq, dk, dv

    dq, dk, dv = jax.lax.map(one_head, (qg, kg, vg, qsg, ksg, dog, lse, delta))
    dq = _from_groups(dq, bsz, hkv).astype(q.dtype)
    dk = dk.reshape(bsz, hkv, t_len, d).transpose(0, 2, 1, 3).astype(k.dtype)
    dv = dv.reshape(bsz, hkv, t_len, d).transpose(0, 2, 1, 3).astype(v.dtype)
    return dq, dk, dv
