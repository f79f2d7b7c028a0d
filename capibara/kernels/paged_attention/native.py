"""Loads and calls the native CPU kernel (``paged_attention.cc``, an XLA FFI handler).

Built on first use by ``capibara.kernels.native_build`` (the local C++ compiler, cached). The
source is portable C++ (no instruction-set requirement), so it runs wherever a C++
compiler is on ``PATH``; without one ``available()`` is False, ``reason()`` says why,
and ``implementation=None`` runs the ``"xla"`` path. f32 and bf16 only.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from capibara.kernels import native_build

TARGET = "capibara_paged_attention"
SOURCE = Path(__file__).with_name("paged_attention.cc")
DTYPES = (jnp.float32, jnp.bfloat16)


KERNEL = native_build.Kernel(SOURCE, TARGET, "CapibaraPagedAttention")
available, reason = KERNEL.available, KERNEL.reason


def paged_attention(
    q,
    k_pages,
    v_pages,
    lengths,
    page_table,
    *,
    scale: float,
    logits_soft_cap: float | None = None,
    sliding_window: int | None = None,
):
    """``q [B, S, Hq, D]`` against the paged cache -> ``[B, S, Hq, D]`` in ``q.dtype``;
    the arguments as in ``reference.paged_attention`` (f32 or bf16, ``int32`` lengths
    and table; bf16 pools may be their ``uint16`` bits)."""
    if (why_not := reason()) is not None:
        raise ValueError(f"paged_attention: the native kernel is unavailable: {why_not}")
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential"
    )
    # bf16 pools as they come, bf16 or their uint16 bits: a bitcast between the two is
    # a whole-pool copy on XLA:CPU (measured in the engine: 24 pool copies, ~0.8 ms
    # of a batch-8 decode step of the small model).
    return call(
        q,
        k_pages,
        v_pages,
        lengths,
        page_table,
        scale=np.float32(scale),
        soft_cap=np.float32(logits_soft_cap or 0.0),
        window=np.int64(sliding_window or 0),
    )
