"""Loads and calls the native CPU kernel (``quantized_decode.cc``, an XLA FFI handler).

Built on first use by ``capibara.kernels.native_build`` (local C++ compiler,
``-march=native``, cached); portable vector code, so it runs wherever a compiler is.
Without one ``available()`` is False, ``reason()`` says why, and
``implementation=None`` uses the xla path.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from capibara.kernels import _platform, native_build

TARGET = "capibara_quantized_decode"
SOURCE = Path(__file__).with_name("quantized_decode.cc")
# Rows up to which implementation=None runs the kernel on CPU: it reads the weight
# once per 4 rows. make bench K=quantized (docs/quantization.md): 8-16x faster than
# the xla path at 1-4 rows; at 8 rows it would read the weight twice.
MAX_ROWS = 4

KERNEL = native_build.Kernel(SOURCE, TARGET, "CapibaraQuantizedDecode")
available, reason = KERNEL.available, KERNEL.reason


def matmul(x: jax.Array, w, out_dtype) -> jax.Array:
    """``x [M, K] @ W`` for a ``QuantizedWeight`` through the native kernel -> ``[M, N]``."""
    n = w.shape[1]
    call = jax.ffi.ffi_call(
        TARGET,
        jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
        vmap_method="sequential",
    )
    mins = w.scales if w.mins is None else w.mins  # unread without has_mins
    run = functools.partial(
        call, bits=w.bits, group=w.group, offset=w.offset, has_mins=w.mins is not None
    )
    # only_on: in a multi-platform export the TPU module must not hold this call.
    y = _platform.only_on("cpu", run)(x.astype(jnp.float32), w.values, w.scales, mins)
    return y.astype(out_dtype)
