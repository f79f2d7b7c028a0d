"""Materialized-scores attention: plain ``jax.numpy``, obviously correct; the test oracle.

Memory is O(B·H·S·T): it builds every logit. Every other implementation is tested
against this one (values, and gradients through ``jax.vjp`` of this function).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from capibara.kernels.flash_attention import masks


def attention_and_lse(q, k, v, q_segments, kv_segments, *, spec: masks.MaskSpec, scale: float, cap):
    """``softmax(mask(cap(scale · q kᵀ))) v`` and its log-sum-exp; plain autodiff.

    Args:
      q: ``[B, S, Hq, D]``; k: ``[B, T, Hkv, D]``; v: ``[B, T, Hkv, Dv]``, ``Hq % Hkv == 0``.
      q_segments: int32 ``[B, S]`` or ``None``; kv_segments: int32 ``[B, T]`` or ``None``.
      spec: mask structure; scale: logit scale; cap: soft-cap or ``None``.

    Returns:
      ``(out [B, S, Hq, Dv] in q.dtype, lse [B, S, Hq] f32)``; a row that sees no key
      has ``out = 0`` and ``lse = -inf``.
    """
    b, s, hq, d = q.shape
    t, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    qg = q.astype(jnp.float32).reshape(b, s, hkv, g, d)
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("bskgd,btkd->bkgst", qg, k.astype(jnp.float32), precision=hi) * scale
    logits = masks.soft_cap(logits, cap)
    q_pos = jnp.arange(s, dtype=jnp.int32)[:, None]
    k_pos = jnp.arange(t, dtype=jnp.int32)[None, :]
    if q_segments is None:
        mask = masks.visible(spec, q_pos, k_pos)[None, None, None]
    else:
        mask = masks.visible(spec, q_pos, k_pos, q_segments[:, :, None], kv_segments[:, None, :])[
            :, None, None
        ]  # [B, 1, 1, S, T]
    logits = jnp.where(mask, logits, masks.MASK_VALUE)
    # Softmax is shift-invariant, so the max carries no gradient.
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    # A row with nothing visible has max -inf: subtract 0 instead, so exp gives 0, not NaN.
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(logits - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    empty = denom == 0.0
    safe = jnp.where(empty, 1.0, denom)  # double where: no NaN gradient from log(0)
    p = p / safe
    lse = jnp.where(empty, masks.MASK_VALUE, row_max + jnp.log(safe))[..., 0]  # [B, K, G, S]
    out = jnp.einsum("bkgst,btkd->bskgd", p, v.astype(jnp.float32), precision=hi)
    lse = lse.reshape(b, hq, s).transpose(0, 2, 1)
    return out.reshape(b, s, hq, dv).astype(q.dtype), lse


def attention(q, k, v, q_segments, kv_segments, *, spec: masks.MaskSpec, scale: float, cap):
    """The output of ``attention_and_lse`` alone: ``[B, S, Hq, Dv]`` in ``q.dtype``."""
    return attention_and_lse(q, k, v, q_segments, kv_segments, spec=spec, scale=scale, cap=cap)[0]
