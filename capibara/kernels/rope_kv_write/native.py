"""Loads and calls the native CPU kernel (``rope_kv_write.cc``, an XLA FFI handler).

Built on first use by ``capibara.kernels.native_build`` (the local C++ compiler, cached);
portable C++, so it runs wherever a compiler is on ``PATH``. Without one
``available()`` is False, ``reason()`` says why, and ``implementation=None`` runs the
XLA path. f32 and bf16 (pools also as their ``uint16`` bits).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from capibara.kernels import _platform, native_build

TARGET = "capibara_rope_kv_write"
SOURCE = Path(__file__).with_name("rope_kv_write.cc")
DTYPES = (jnp.float32, jnp.bfloat16)
POOL_DTYPES = (*DTYPES, jnp.uint16)

KERNEL = native_build.Kernel(SOURCE, TARGET, "CapibaraRopeKvWrite")
available, reason = KERNEL.available, KERNEL.reason


def rope_kv_write(q, k, v, cos, sin, k_pages, v_pages, write_pages, write_offsets):
    """``reference.rope_kv_write`` as one custom call, the pools updated in place."""
    call = jax.ffi.ffi_call(
        TARGET,
        (
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
            jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype),
        ),
        input_output_aliases={5: 1, 6: 2},
    )
    # only_on: in a multi-platform export the TPU module must not hold this call.
    run = _platform.only_on("cpu", call)
    return run(q, k, v, cos, sin, k_pages, v_pages, write_pages, write_offsets)
