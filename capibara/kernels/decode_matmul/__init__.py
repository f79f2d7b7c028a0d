"""Decode matmul: a few rows of activations times a 16-bit weight, f32 accumulation.

    y = capibara.kernels.decode_matmul(x, w)  # x [..., K] @ w [K, N] -> f32 [..., N]
    y = capibara.kernels.decode_matmul(x, table, w_transposed=True)  # w [N, K]: a tied head

The products of a decode step (one new token per sequence, so as many rows as
sequences) read every weight once per step: they are bound by the speed at which the
weights stream from memory. On XLA:CPU a bf16 dot streams them at about half the
bandwidth its f32 dot reaches, so bf16 weights bought no speed there.

Implementations (``implementation=``):
  * ``"reference"``: f32 einsum at ``Precision.HIGHEST``; the oracle.
  * ``"xla"``: ``lax.dot_general`` with f32 accumulation (one 16-bit row padded to
    two, see ``xla.py``). Runs everywhere; the default off CPU and for f32 / f16.
  * ``"native"``: a C++ kernel for XLA:CPU (``decode_matmul.cc``, XLA FFI custom
    call) using AVX512-BF16 ``vdpbf16ps``, split across XLA's intra-op threads. bf16
    only. Compiled on first use with the local C++ compiler and ``-march=native``
    (``capibara.kernels.native_build``); unavailable without a compiler or on a CPU without
    AVX512-BF16, where ``native.reason()`` says why.
  ``None`` picks ``"native"`` on CPU when it is available, both operands are bf16 and
  there are at most ``max_native_rows(w_transposed)`` rows (16 for ``[K, N]``, 64 for
  ``[N, K]``; more rows: XLA's GEMM, which reuses each weight, is faster); ``"xla"``
  otherwise. Not a Pallas kernel (Pallas does not target CPUs); on TPU/GPU this op is
  XLA's dot (not measured there: no accelerator has been available).

Differentiable: the native path's backward pass uses XLA dots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from capibara.kernels import _mesh, _platform
from capibara.kernels.decode_matmul import native, reference, xla

__all__ = [
    "IMPLEMENTATIONS",
    "MAX_NATIVE_ROWS",
    "MAX_NATIVE_ROWS_TRANSPOSED",
    "bytes_accessed",
    "decode_matmul",
    "flops",
    "max_native_rows",
]

IMPLEMENTATIONS = ("native", "xla", "reference")
# Rows up to which implementation=None runs the native kernel, per weight layout. It
# reads the weights once per 8 rows, so XLA's GEMM (which reuses them) wins beyond.
# Measured on 2 cores, the small model's 84 layer matmuls, native vs XLA's bf16 dot:
# w [K, N]: 1.4x at 16 rows, 1.0x at 32, 0.8x at 64; w [N, K]: 1.4x at 32, 1.3x at
# 64, 1.0x at 96, 0.94x at 128.
MAX_NATIVE_ROWS = 16
MAX_NATIVE_ROWS_TRANSPOSED = 64


def max_native_rows(w_transposed: bool) -> int:
    """Rows up to which ``implementation=None`` picks the native kernel on CPU."""
    return MAX_NATIVE_ROWS_TRANSPOSED if w_transposed else MAX_NATIVE_ROWS


def flops(m: int, k: int, n: int) -> float:
    return 2.0 * m * k * n


def bytes_accessed(m: int, k: int, n: int, itemsize: int = 2) -> float:
    """Weights and activations read once, the f32 output written once."""
    return float(itemsize * (k * n + m * k) + 4 * m * n)


def decode_matmul(
    x: jax.Array,
    w: jax.Array,
    *,
    w_transposed: bool = False,
    implementation: str | None = None,
) -> jax.Array:
    """``x @ w`` accumulated and returned in f32.

    Args:
      x: ``[..., K]`` activations (leading dims flattened into rows).
      w: ``[K, N]`` weight, or ``[N, K]`` with ``w_transposed=True``.
      w_transposed: ``w`` is stored ``[N, K]`` (``"...k,nk->...n"``).
      implementation: ``None`` (best here, see the module docstring), ``"native"``,
        ``"xla"`` or ``"reference"``.

    Returns:
      f32 ``[..., N]``.
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"decode_matmul: implementation={implementation!r} is not one of None, "
            + ", ".join(map(repr, IMPLEMENTATIONS))
        )
    if x.ndim < 1 or w.ndim != 2:
        raise ValueError(f"decode_matmul: x must be [..., K] and w 2-D, got {x.shape=} {w.shape=}")
    k = w.shape[1] if w_transposed else w.shape[0]
    if x.shape[-1] != k:
        raise ValueError(
            f"decode_matmul: x [..., {x.shape[-1]}] does not contract with w {w.shape} "
            f"({w_transposed=})"
        )
    for name, a in (("x", x), ("w", w)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"decode_matmul: {name} must be floating, got {a.dtype}")
    lead = x.shape[:-1]
    rows = x.reshape(-1, k)
    n = w.shape[0] if w_transposed else w.shape[1]
    fn = _pick(implementation, rows, w, w_transposed)
    w_axes = ("cols", None) if w_transposed else (None, "cols")
    out = _mesh.run_per_shard(
        "decode_matmul", fn, (rows, w), (("rows", None), w_axes), ("rows", "cols")
    )
    return out.reshape(*lead, n)


def _pick(implementation, rows, w, w_transposed):
    """``(x, w) -> y`` for this choice (``_platform.dispatch``, which decides the
    platform at lowering)."""
    bf16 = rows.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16
    if implementation == "native":
        if not bf16:
            raise ValueError(
                f"decode_matmul: implementation='native' takes bf16 x and w, got "
                f"{rows.dtype} and {w.dtype}"
            )
        if not native.available():
            raise ValueError(
                f"decode_matmul: implementation='native' unavailable: {native.reason()}"
            )
    impls = {
        "xla": lambda x, w: _xla(x, w, w_transposed),
        "reference": lambda x, w: _reference(x, w, w_transposed),
    }
    fits = bf16 and rows.shape[0] <= max_native_rows(w_transposed) and native.available()
    if implementation == "native" or (implementation is None and fits):
        impls["native"] = lambda x, w: _native(x, w, w_transposed)
    return _platform.dispatch("decode_matmul", implementation, False, impls)


def _xla(x, w, w_transposed):
    return xla.matmul(x, w, w_transposed=w_transposed)


def _reference(x, w, w_transposed):
    return reference.matmul(x, w, w_transposed=w_transposed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _native(x, w, w_transposed):
    return native.matmul(x, w, w_transposed=w_transposed)


def _native_fwd(x, w, w_transposed):
    return _native(x, w, w_transposed), (x, w)


def _native_bwd(w_transposed, residuals, g):
    x, w = residuals
    f32 = jnp.float32
    if w_transposed:  # y = x @ w.T
        dx = jnp.dot(g, w, preferred_element_type=f32)
        dw = jnp.dot(g.T, x, preferred_element_type=f32)
    else:
        dx = jnp.dot(g, w.T, preferred_element_type=f32)
        dw = jnp.dot(x.T, g, preferred_element_type=f32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_native.defvjp(_native_fwd, _native_bwd)
