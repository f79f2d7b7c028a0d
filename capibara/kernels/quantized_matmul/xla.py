"""The XLA path: dequantize in the activations' dtype, one dot with f32 accumulation.

The per-group scales do not factor out of a dot over ``K`` (each group has its own),
so the weight is rebuilt ``scales · (q - offset) + mins`` in f32 and rounded to the
compute dtype (bf16 for bf16 activations: what the MXU/AVX dot takes), and XLA fuses
that elementwise rebuild into one pass. Per-channel weights (one group) take the
cheaper ``(x @ q) · scales`` form: the integer values convert exactly.

It reads the packed bytes, but XLA writes the rebuilt weight before its dot, so this
path is as fast as a float weight at best; the Pallas kernel rebuilds per VMEM tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(x_dtype) -> jnp.dtype:
    """bf16 activations multiply bf16 weights; anything else multiplies in f32."""
    return jnp.dtype(jnp.bfloat16) if x_dtype == jnp.bfloat16 else jnp.dtype(jnp.float32)


def matmul(x, w, out_dtype):
    """``x [M, K] @ W [K, N]`` for a ``QuantizedWeight`` ``w``; f32 accumulation."""
    cdt = compute_dtype(x.dtype)
    dims = (((1,), (0,)), ((), ()))
    if w.num_groups == 1 and w.mins is None:
        q = (w.unpacked() - w.offset).astype(cdt)  # small integers: exact in bf16
        y = jax.lax.dot_general(x.astype(cdt), q, dims, preferred_element_type=jnp.float32)
        return (y * w.scales[0]).astype(out_dtype)
    y = jax.lax.dot_general(
        x.astype(cdt), w.dequantize(cdt), dims, preferred_element_type=jnp.float32
    )
    return y.astype(out_dtype)
