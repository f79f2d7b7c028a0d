"""Quantized matmul: activations times an int8 or int4 weight, f32 accumulation.

    qw = capibara.kernels.quantize(w, bits=4, group=32)     # w [K, N] -> QuantizedWeight
    y = capibara.kernels.quantized_matmul(x, qw)            # x [..., K] -> [..., N]

Weights: int8 per output channel (or per group), int4 per group of 32/64/128 rows with
an optional min (GGUF's Q8_0, Q4_0 and Q4_1 are these layouts for group 32, loaded by
``QuantizedWeight.from_gguf`` without a float round trip); see ``weights.py``.

Implementations (``implementation=``):
  * ``"reference"``: dequantize to f32, f32 matmul at ``HIGHEST``; the oracle.
  * ``"xla"``: dequantize in the activations' dtype, one dot (``xla.py``); the default
    off TPU. It streams the packed bytes but writes the rebuilt weight, so it is not
    faster than a float weight.
  * ``"pallas"``: a Mosaic TPU kernel that rebuilds each weight tile in VMEM
    (``pallas_tpu.py``); the TPU default; ``interpret=True`` runs it in the TPU
    interpreter (how it is tested). Not run on a TPU yet.
  * ``"native"``: a C++ kernel for XLA:CPU (``quantized_decode.cc``) that widens the
    packed bytes in registers and reads them once; ``None`` picks it on CPU for up to
    ``native.MAX_ROWS`` rows (decode steps) where it builds.

Differentiable in ``x`` (the weight is a constant: ``dx = dy @ Wᵀ`` through the
dequantized weight); integer weights have no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from capibara.kernels import _mesh, _platform
from capibara.kernels.quantized_matmul import native, pallas_tpu, reference, xla
from capibara.kernels.quantized_matmul.pallas_tpu import BlockSizes
from capibara.kernels.quantized_matmul.weights import (
    QuantizedWeight,
    from_gguf,
    quantize,
)

__all__ = [
    "BlockSizes",
    "QuantizedWeight",
    "from_gguf",
    "quantize",
    "quantized_matmul",
]


def quantized_matmul(
    x,
    w: QuantizedWeight,
    *,
    preferred_element_type=None,
    implementation: str | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """``x @ W`` for a quantized ``W [K, N]``.

    Args:
      x: ``[..., K]`` float activations (f32, bf16 or f16).
      w: a ``QuantizedWeight`` of shape ``(K, N)``.
      preferred_element_type: output dtype; ``None`` = ``x.dtype``. Accumulation is f32
        whatever it is.
      implementation: ``None``, ``"pallas"``, ``"xla"``, ``"native"`` or ``"reference"``.
      interpret: run the Pallas kernel in the Pallas TPU interpreter.
      block_sizes: Pallas tiles (``BlockSizes``); ``None`` = default.

    Returns:
      ``[..., N]``.
    """
    if not isinstance(w, QuantizedWeight):
        raise TypeError(f"w must be a QuantizedWeight, got {type(w).__name__}")
    x = jnp.asarray(x)
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be float [..., K], got x: {x.dtype}{list(x.shape)}")
    k, n = w.shape
    if x.shape[-1] != k:
        raise ValueError(
            f"x [..., {x.shape[-1]}] does not contract with w of shape (K, N)={w.shape}"
        )
    out_dtype = x.dtype if preferred_element_type is None else jnp.dtype(preferred_element_type)
    blocks = BlockSizes() if block_sizes is None else block_sizes
    if not isinstance(blocks, BlockSizes):
        raise TypeError(f"block_sizes must be quantized_matmul.BlockSizes, got {blocks!r}")
    lead = x.shape[:-1]
    rows = x.reshape(-1, k)

    def run(rows, values, scales, mins):
        qw = QuantizedWeight(values, scales, mins, w.bits, w.group, w.offset, w.shape)
        return _matmul(rows, qw, out_dtype, implementation, interpret, blocks)

    out = _mesh.run_per_shard(
        "quantized_matmul",
        run,
        (rows, w.values, w.scales, w.mins),
        (("rows", None), (None, "cols"), (None, "cols"), (None, "cols")),
        ("rows", "cols"),
    )
    return out.reshape(*lead, n)


def _matmul(rows, w, out_dtype, implementation, interpret, blocks):
    if implementation == "native" and not native.available():
        raise ValueError(
            f"quantized_matmul: implementation='native' unavailable: {native.reason()}"
        )
    impls = {
        "reference": lambda x, w: reference.matmul(x, w, out_dtype),
        "xla": lambda x, w: xla.matmul(x, w, out_dtype),
        "pallas": _rows_folded(
            lambda x, w: pallas_tpu.matmul(x, w, out_dtype, blocks=blocks, interpret=interpret)
        ),
    }
    few_rows = rows.shape[0] <= native.MAX_ROWS
    if implementation == "native" or (implementation is None and few_rows and native.available()):
        impls["native"] = lambda x, w: native.matmul(x, w, out_dtype)
    run = _platform.dispatch("quantized_matmul", implementation, interpret, impls)
    if implementation == "reference":
        return run(rows, w)  # plain autodiff
    return _with_input_grad(run, rows, w)


def _rows_folded(fn):
    """``fn(x [M, K], w)`` whose ``vmap`` over ``x`` folds the mapped axis into the rows
    (one kernel launch) instead of Pallas' batching rule, which adds a grid axis that
    the kernel's ``dimension_semantics`` do not name. A mapped weight runs ``lax.map``."""

    @jax.custom_batching.custom_vmap
    def folded(x, w):
        return fn(x, w)

    @folded.def_vmap
    def _rule(axis_size, in_batched, x, w):
        x_batched, w_batched = in_batched
        if any(jax.tree.leaves(w_batched)):
            x = x if x_batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            w = _broadcast(w, w_batched, axis_size)
            return jax.lax.map(lambda xw: folded(*xw), (x, w)), True
        m = x.shape[1]
        out = folded(x.reshape(axis_size * m, x.shape[2]), w)
        return out.reshape(axis_size, m, out.shape[1]), True

    return folded


def _broadcast(w, batched, size):
    """``w``'s leaves with a leading axis of ``size`` (unbatched ones broadcast)."""
    return jax.tree.map(lambda a, b: a if b else jnp.broadcast_to(a, (size, *a.shape)), w, batched)


def _with_input_grad(run, rows, w):
    """``run(rows, w)`` whose gradient in ``rows`` is ``dy @ Wᵀ`` (the kernels have no
    autodiff rule of their own). The weight is data: zero cotangents (float0 for the
    integer values)."""

    @jax.custom_vjp
    def f(x, w):
        return run(x, w)

    def fwd(x, w):
        return run(x, w), w

    def bwd(w, dy):
        wt = w.dequantize(xla.compute_dtype(rows.dtype))
        dims = (((1,), (1,)), ((), ()))
        dx = jax.lax.dot_general(dy.astype(wt.dtype), wt, dims, preferred_element_type=jnp.float32)
        zero = jax.tree.map(_zero_cotangent, w)
        return dx.astype(rows.dtype), zero

    f.defvjp(fwd, bwd)
    return f(rows, w)


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


def lowering_cases():
    """TPU export cases for ``make lower``: int8 per-channel, int4 Q4_1-style groups."""
    from capibara.kernels.lowering import LoweringCase

    x = jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16)

    def case(bits, group, zero_point=None):
        k, n = 4096, 1024
        w = jax.eval_shape(
            lambda a: quantize(a, bits, group, zero_point=zero_point),
            jax.ShapeDtypeStruct((k, n), jnp.float32),
        )

        def f(x, values, scales, *mins):
            qw = QuantizedWeight(
                values, scales, mins[0] if mins else None, bits, w.group, w.offset, (k, n)
            )
            return quantized_matmul(x, qw, implementation="pallas")

        extra = (w.mins,) if w.mins is not None else ()
        return f, (x, w.values, w.scales, *extra)

    cases = []
    for name, args in (
        ("int8 per-channel", (8, None)),
        ("int8 group=128", (8, 128)),
        ("int4 group=32 min (Q4_1)", (4, 32)),
        ("int4 group=128 symmetric", (4, 128, False)),
    ):
        f, shapes = case(*args)
        cases.append(LoweringCase(f"quantized_matmul.forward({name})", f, shapes))
    return cases
