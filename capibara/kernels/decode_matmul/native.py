"""Loads and calls the native CPU kernel (``decode_matmul.cc``, an XLA FFI handler).

Built on first use by ``capibara.kernels.native_build`` (local C++ compiler, ``-march=native``,
cached). It runs only where the compiler targets AVX512-BF16 (``vdpbf16ps``); without
it (no compiler, another CPU) ``available()`` is False, ``reason()`` says why, and
``implementation=None`` uses XLA's dot.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from capibara.kernels import _platform, native_build

TARGET = "capibara_decode_matmul"
SOURCE = Path(__file__).with_name("decode_matmul.cc")


def _targets_dpbf16(library) -> str | None:
    if not library.CapibaraDecodeMatmulUsesDpbf16():
        return "the compiler does not target AVX512-BF16 on this CPU (-march=native)"
    return None


KERNEL = native_build.Kernel(SOURCE, TARGET, "CapibaraDecodeMatmul", _targets_dpbf16)
available, reason = KERNEL.available, KERNEL.reason


def matmul(x: jax.Array, w: jax.Array, *, w_transposed: bool) -> jax.Array:
    """``x [M, K] @ w`` in f32 through the native kernel; both bf16, 2-D.

    ``w`` is ``[K, N]``, or ``[N, K]`` with ``w_transposed``. Returns f32 ``[M, N]``.
    """
    n = w.shape[0] if w_transposed else w.shape[1]
    call = jax.ffi.ffi_call(
        TARGET,
        jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
        vmap_method="sequential",
    )
    # bf16 straight in: a bitcast to uint16 would be a copy on XLA:CPU (through f32).
    # only_on: in a multi-platform export the TPU module must not hold this call.
    return _platform.only_on("cpu", functools.partial(call, transposed=w_transposed))(x, w)
