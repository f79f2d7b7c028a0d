"""Flash attention: ``softmax(q kᵀ · scale) v`` without materializing the scores.

    out = capibara.kernels.flash_attention(q, k, v, causal=True)        # [B, S, Hq, Dv]

Features: GQA/MQA (``Hq`` a multiple of ``Hkv``; k/v are never repeated in memory),
``v`` with its own head dim (``Dv``, e.g. MLA's qk 192 / v 128), ``S != T`` with causal
aligned bottom-right (query ``i`` sits at key position ``T - S + i``) or top-left
(``alignment="top_left"``: position ``i``, as ``jax.nn.dot_product_attention``),
``segment_ids`` for packed sequences, ``sliding_window`` or ``jax.nn``'s
``local_window_size=(left, right)``, ``logits_soft_cap``, a static or traced ``scale``,
any ``S``, ``T``, ``D``; a query that sees no key returns zeros. Inputs ``[B, S, H, D]``,
unbatched ``[S, H, D]`` or several batch dims ``[..., S, H, D]``. f32 and bf16 inputs
(f16 too), f32 softmax statistics. Differentiable (``custom_vjp`` whose backward kernel
recomputes probabilities from the saved log-sum-exp); ``return_residual=True`` also
returns that log-sum-exp (differentiable as well).

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

``capibara.kernels.dot_product_attention`` (``attention_compat``) is the drop-in for
``jax.nn.dot_product_attention`` built on this op.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp

from capibara.kernels import _mesh, _platform
from capibara.kernels.flash_attention import _args, ops, reference
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
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if not ok or value <= 0 or value % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {name}={value!r}")
            object.__setattr__(self, name, int(value))  # numpy ints -> int (hashable, static)

    @classmethod
    def get_default(cls) -> BlockSizes:
        return cls()


def flops(b: int, h: int, s: int, t: int, d: int, *, causal: bool, backward: bool = False):
    """Nominal attention FLOPs: ``4·B·H·S·T·D``, ×0.5 causal, ×2.5 with backward."""
    f = 4 * b * h * s * t * d
    return f * (0.5 if causal else 1.0) * (2.5 if backward else 1.0)


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
    local_window_size: int | tuple[int, int] | None = None,
    alignment: str = "bottom_right",
    logits_soft_cap: float | None = None,
    scale: float | jax.Array | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    return_residual: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention in the layout of ``jax.nn.dot_product_attention``.

    Args:
      q: ``[..., S, Hq, D]`` queries (``[B, S, Hq, D]``, unbatched ``[S, Hq, D]``, or
        several batch dims); any array-like.
      k: ``[..., T, Hkv, D]`` keys, ``Hq % Hkv == 0`` (GQA; ``Hkv = 1`` is MQA).
      v: ``[..., T, Hkv, Dv]`` values (``Dv`` may differ from ``D``).
      causal: query ``i`` sees keys ``j <= p(i)``, its key position ``p(i)`` (see
        ``alignment``).
      segment_ids: ``(q_segments int[..., S], kv_segments int[..., T])``; a query sees
        only keys of its own segment.
      sliding_window: ``w``: query ``i`` sees keys ``j > p(i) - w`` (with ``causal``,
        the last ``w`` keys up to itself; without, also ``j < p(i) + w``).
      local_window_size: ``jax.nn``'s window, exclusive with ``sliding_window``:
        ``(left, right)``: keys ``p(i) - left <= j <= p(i) + right``; an int ``w`` is
        ``(w, w)``. ``sliding_window=w`` with ``causal`` equals ``(w - 1, 0)``.
      alignment: ``"bottom_right"`` (``p(i) = T - S + i``: the last query sees the last
        key, as prefill onto a cache) or ``"top_left"`` (``p(i) = i``, ``jax.nn``'s).
        Fully masked tiles are skipped either way.
      logits_soft_cap: ``c``: logits become ``c · tanh(logits / c)`` before masking.
      scale: logit scale; ``None`` = ``1 / sqrt(D)``. A traced scalar (under ``jit`` or
        ``grad``) works too: it is applied to ``q`` before the kernels (for bf16 ``q``
        that rounds ``q · scale`` to bf16), a static number inside them.
      implementation: ``None`` (best for the platform, decided at lowering), ``"pallas"``,
        ``"xla"`` or ``"reference"``.
      interpret: run the Pallas kernels in the Pallas TPU interpreter.
      block_sizes: ``BlockSizes``; ``None`` = default.
      return_residual: also return the log-sum-exp of each row's logits.

    Returns:
      ``out [..., S, Hq, Dv]`` in ``q.dtype``; rows that see no key are zeros. With
      ``return_residual``, ``(out, lse [..., S, Hq] f32)`` with ``lse = -inf`` for those rows.
    """
    x = _args.inputs(q, k, v, segment_ids)
    (_, s, hq, d), (_, t, hkv, dv) = x.q.shape, x.v.shape
    spec = _args.mask_spec(
        s,
        t,
        causal=causal,
        sliding_window=sliding_window,
        local_window_size=local_window_size,
        alignment=alignment,
    )
    cap = None
    if logits_soft_cap is not None:
        cap = _args.as_float("logits_soft_cap", logits_soft_cap)
        if cap <= 0:
            raise ValueError(f"logits_soft_cap must be > 0, got {logits_soft_cap=}")
    interpret = _args.as_bool("interpret", interpret)
    return_residual = _args.as_bool("return_residual", return_residual)
    block_sizes = BlockSizes.get_default() if block_sizes is None else block_sizes
    if not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be BlockSizes, got {type(block_sizes).__name__}")
    scale = _args.scale(scale)
    qx = x.q
    if isinstance(scale, jax.Array):
        # A traced scale cannot be a static kernel constant: fold it into q (exact in f32;
        # autodiff then gives dq·scale and d(scale) = Σ dq'·q outside the kernels).
        qx = (qx.astype(jnp.float32) * scale).astype(qx.dtype)
        scale = 1.0
    scale = float(1.0 / math.sqrt(d) if scale is None else scale)

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
        return reference.attention_and_lse(q, k, v, q_seg, kv_seg, spec=spec, scale=scale, cap=cap)

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
    out, lse = _mesh.run_per_shard(
        "flash_attention",
        run,
        (qx, x.k, x.v, x.q_seg, x.kv_seg),
        (heads, kv_heads, kv_heads, segments, segments),
        (heads, ("batch", None, "heads")),
    )
    out = out.reshape(*x.lead, s, hq, dv)
    if return_residual:
        return out, lse.reshape(*x.lead, s, hq)
    return out


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

    # DeepSeek MLA head dims (qk 192, v 128), jax.nn's top-left window over T = 2S.
    mla_q = jax.ShapeDtypeStruct((b, s, hq, 192), jnp.bfloat16)
    mla_k = jax.ShapeDtypeStruct((b, 2 * s, hkv, 192), jnp.bfloat16)
    mla_v = jax.ShapeDtypeStruct((b, 2 * s, hkv, 128), jnp.bfloat16)

    def mla_backward(q, k, v):
        def f(q, k, v):
            return attend(q, k, v, local_window_size=(200, 0), alignment="top_left")

        out, vjp = jax.vjp(f, q, k, v)
        return vjp(out)

    return [
        LoweringCase("flash_attention.forward", forward, (q, kv, kv)),
        LoweringCase("flash_attention.forward(segments)", forward_segments, (q, kv, kv, *segs)),
        LoweringCase("flash_attention.backward(dq,dk,dv)", backward, (q, kv, kv)),
        LoweringCase(
            "flash_attention.fwd+bwd(mla d=192/dv=128, top-left window)",
            mla_backward,
            (mla_q, mla_k, mla_v),
        ),
    ]
