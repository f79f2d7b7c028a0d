"""Flash attention: ``softmax(q kᵀ · scale) v`` without materializing the scores.

    out = capibara.kernels.flash_attention(q, k, v, causal=True)        # [B, S, Hq, D]

Features: GQA/MQA (``Hq`` a multiple of ``Hkv``; k/v are never repeated in memory),
``S != T`` with causal aligned bottom-right (query ``i`` sits at key position
``T - S + i``), ``segment_ids`` for packed sequences, ``sliding_window``,
``logits_soft_cap``, any ``S``, ``T``, ``D``; a query that sees no key returns zeros.
f32 and bf16 inputs, f32 softmax statistics. Differentiable (``custom_vjp`` whose
backward kernel recomputes probabilities from the saved log-sum-exp).

Implementations (``implementation=``):
  * ``"reference"``: materialized ``[B, H, S, T]`` scores; the oracle (plain autodiff).
  * ``"xla"``: 2-D dots over query blocks and key chunks with an online softmax; the
    host fixes each block's chunk range, so fully masked causal/windowed chunks are
    never computed; memory O(S·block).
    The CPU/GPU default.
  * ``"pallas"``: Mosaic TPU kernels (forward, dq, dk/dv) walking a host-built list of
    the visible (query tile, key tile) pairs by scalar prefetch; fully masked tiles
    are not in the grid. The TPU default; ``interpret=True`` runs it in the Pallas TPU
    interpreter anywhere (this is how it is tested on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from capibara.kernels import _mesh, _platform
from capibara.kernels.flash_attention import ops, reference
from capibara.kernels.flash_attention.masks import MaskSpec

__all__ = ["BlockSizes", "MaskSpec", "flash_attention", "flops"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiling. Blocks are clamped to the problem, so short sequences don't pad to them.

    Attributes:
      block_q: query tile of the Pallas kernels (multiple of 8, the TPU sublane).
      block_k: key tile of the Pallas kernels (multiple of 8; TPU lowering wants a
        multiple of 128 unless one tile covers all keys).
      xla_block_q: rows per dot of the xla path: a block holds ``xla_block_q / G``
        query positions of the ``G = Hq/Hkv`` heads sharing a kv head.
      xla_block_k: keys per step of the xla path (its logits are ``[rows, xla_block_k]``).
    """

    block_q: int = 512
    block_k: int = 512
    xla_block_q: int = 256
    xla_block_k: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_k", "xla_block_q", "xla_block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {name}={value}")

    @classmethod
    def get_default(cls) -> BlockSizes:
        return cls()


def flops(b: int, h: int, s: int, t: int, d: int, *, causal: bool, backward: bool = False):
    """Nominal attention FLOPs: ``4·B·H·S·T·D``, ×0.5 causal, ×2.5 with backward."""
    f = 4 * b * h * s * t * d
    return f * (0.5 if causal else 1.0) * (2.5 if backward else 1.0)


def _validate(q, k, v, segment_ids, sliding_window, logits_soft_cap, scale) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got {x.shape=}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got {x.dtype=}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape=}, {v.shape=}")
    (b, s, hq, d), (bk, t, hkv, dk) = q.shape, k.shape
    if b != bk or d != dk:
        raise ValueError(f"q and k must agree on batch and head_dim, got {q.shape=}, {k.shape=}")
    if s == 0 or t == 0 or hq == 0 or hkv == 0 or d == 0:
        raise ValueError(f"empty dimension in {q.shape=} or {k.shape=}")
    if hq % hkv:
        raise ValueError(f"query heads must be a multiple of kv heads, got Hq={hq}, Hkv={hkv}")
    if segment_ids is not None:
        if not (isinstance(segment_ids, tuple | list) and len(segment_ids) == 2):
            raise TypeError("segment_ids must be a pair (q_segments [B, S], kv_segments [B, T])")
        qs, ks = segment_ids
        if qs.shape != (b, s) or ks.shape != (b, t):
            raise ValueError(
                f"segment_ids must be [B, S]={(b, s)} and [B, T]={(b, t)}, "
                f"got {qs.shape=}, {ks.shape=}"
            )
        if not (jnp.issubdtype(qs.dtype, jnp.integer) and jnp.issubdtype(ks.dtype, jnp.integer)):
            raise TypeError(f"segment_ids must be integers, got {qs.dtype}, {ks.dtype}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 0):
        raise ValueError(f"sliding_window must be a positive int, got {sliding_window=}")
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be > 0, got {logits_soft_cap=}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale=}")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Scaled dot-product attention in the layout of ``jax.nn.dot_product_attention``.

    Args:
      q: ``[B, S, Hq, D]`` queries.
      k: ``[B, T, Hkv, D]`` keys, ``Hq % Hkv == 0`` (GQA; ``Hkv = 1`` is MQA).
      v: ``[B, T, Hkv, D]`` values.
      causal: query ``i`` sees keys ``j <= T - S + i`` (bottom-right aligned).
      segment_ids: ``(q_segments int[B, S], kv_segments int[B, T])``; a query sees only
        keys of its own segment.
      sliding_window: ``w``: query ``i`` sees keys ``j > T - S + i - w`` (with ``causal``,
        the last ``w`` keys up to itself; without, also ``j < T - S + i + w``).
      logits_soft_cap: ``c``: logits become ``c · tanh(logits / c)`` before masking.
      scale: logit scale; ``None`` = ``1 / sqrt(D)``.
      implementation: ``None`` (best for the platform, decided at lowering), ``"pallas"``,
        ``"xla"`` or ``"reference"``.
      interpret: run the Pallas kernels in the Pallas TPU interpreter.
      block_sizes: ``BlockSizes``; ``None`` = default.

    Returns:
      ``[B, S, Hq, D]`` in ``q.dtype``. Rows that see no key are zeros.
    """
    _validate(q, k, v, segment_ids, sliding_window, logits_soft_cap, scale)
    block_sizes = block_sizes or BlockSizes.get_default()
    if not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be BlockSizes, got {type(block_sizes).__name__}")
    (_, s, hq, d), (_, t, hkv, _) = q.shape, k.shape
    spec = MaskSpec(q_len=s, kv_len=t, causal=causal, sliding_window=sliding_window)
    scale = float(1.0 / math.sqrt(d) if scale is None else scale)
    cap = None if logits_soft_cap is None else float(logits_soft_cap)
    q_seg, kv_seg = (None, None) if segment_ids is None else segment_ids
    if q_seg is not None:
        q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)

    def backend_call(backend, q, k, v, q_seg, kv_seg):
        if backend == "pallas":
            block_q = min(block_sizes.block_q, _round_up(s, 8))
            block_k = min(block_sizes.block_k, _round_up(t, 8))
        else:
            # Keep the rows of one dot (positions x grouped heads) near xla_block_q.
            block_q = max(8, block_sizes.xla_block_q // (hq // hkv))
            block_q = min(block_q, _round_up(s, 8))
            block_k = min(block_sizes.xla_block_k, _round_up(t, 8))
        cfg = ops.OpConfig(spec, scale, cap, backend, block_q, block_k, interpret)
        return ops.attention(q, k, v, q_seg, kv_seg, cfg)

    def reference_call(q, k, v, q_seg, kv_seg):
        return reference.attention(q, k, v, q_seg, kv_seg, spec=spec, scale=scale, cap=cap)

    run = _platform.dispatch(
        "flash_attention",
        implementation,
        interpret,
        {
            "pallas": functools.partial(backend_call, "pallas"),
            "xla": functools.partial(backend_call, "xla"),
            "reference": reference_call,
        },
    )
    heads = ("batch", None, "heads", None)
    kv_heads = ("batch", None, "kv_heads", None)
    segments = ("batch", None)
    return _mesh.run_per_shard(
        "flash_attention",
        run,
        (q, k, v, q_seg, kv_seg),
        (heads, kv_heads, kv_heads, segments, segments),
        heads,
    )


def lowering_cases():
    """Forward and backward (dq, dk/dv) Pallas kernels, exported for TPU."""
    from capibara.kernels.lowering import LoweringCase

    b, s, hq, hkv, d = 1, 512, 4, 2, 128
    q = jax.ShapeDtypeStruct((b, s, hq, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16)
    segs = (jax.ShapeDtypeStruct((b, s), jnp.int32), jax.ShapeDtypeStruct((b, s), jnp.int32))
    blocks = BlockSizes(block_q=128, block_k=128)
    attend = functools.partial(
        flash_attention, causal=True, implementation="pallas", block_sizes=blocks
    )

    def forward(q, k, v):
        return attend(q, k, v, sliding_window=300, logits_soft_cap=30.0)

    def forward_segments(q, k, v, qs, ks):
        return attend(q, k, v, segment_ids=(qs, ks))

    def backward(q, k, v):
        out, vjp = jax.vjp(forward, q, k, v)
        return vjp(out)

    return [
        LoweringCase("flash_attention.forward", forward, (q, kv, kv)),
        LoweringCase("flash_attention.forward(segments)", forward_segments, (q, kv, kv, *segs)),
        LoweringCase("flash_attention.backward(dq,dk,dv)", backward, (q, kv, kv)),
    ]
