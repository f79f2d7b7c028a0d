"""The oracle, also the portable ("xla") path: rotate q and k in f32, then an indexed
set of k and v into the pools.

The set scatters 16-bit pools as their ``uint16`` bits: XLA:CPU scatters a bf16
operand by converting the whole pool to f32 and back around the scatter, every layer
of every step (at 32 sequences that was half the decode step); the same bits
scattered as integers stay in place (``capibara.kernels.bit_views``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from capibara.kernels.bit_views import from_bits, to_bits


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE, half-split layout (as Hugging Face Llama): ``x [..., H, D]`` by
    ``cos, sin [..., D/2]`` (f32), computed in f32 and returned in ``x.dtype``."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def pool_dtype(pool: jax.Array):
    """The float dtype a pool holds: ``uint16`` pools are bf16 bits
    (``capibara.kernels.bit_views``)."""
    return jnp.bfloat16 if pool.dtype == jnp.uint16 else pool.dtype


def rope_kv_write(q, k, v, cos, sin, k_pages, v_pages, write_pages, write_offsets):
    """See ``capibara.kernels.rope_kv_write``: ``(rotated q, k_pages, v_pages)``."""
    tokens = q.reshape(-1, *q.shape[-2:])  # [N, Hq, D]
    rotated_q = rotate(tokens, cos, sin).reshape(q.shape)
    k = rotate(k, cos, sin)
    return (
        rotated_q,
        _set(k_pages, k, write_pages, write_offsets),
        _set(v_pages, v, write_pages, write_offsets),
    )


def _set(pages, values, write_pages, write_offsets):
    """``pages [Hkv, P, page_size, D]`` with token i's ``values [N, Hkv, D]`` (in the
    pool's dtype) at ``(write_pages[i], write_offsets[i])``; out-of-range slots dropped."""
    values = to_bits(values.transpose(1, 0, 2).astype(pool_dtype(pages)))
    # Negative indices would count from the end: send them out of range, to be dropped.
    write_pages = jnp.where(write_pages < 0, pages.shape[1], write_pages)
    write_offsets = jnp.where(write_offsets < 0, pages.shape[2], write_offsets)
    written = to_bits(pages).at[:, write_pages, write_offsets].set(values, mode="drop")
    return from_bits(written, pages.dtype)
