"""Shared inputs for the flash attention tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def make_qkv(seed, b, s, t, hq, hkv, d, dtype=jnp.float32):
    """Seeded unit-normal ``q [B, S, Hq, D]``, ``k, v [B, T, Hkv, D]``."""
    rng = np.random.default_rng(seed)
    shapes = [(b, s, hq, d), (b, t, hkv, d), (b, t, hkv, d)]
    return [jnp.asarray(rng.standard_normal(sh), dtype) for sh in shapes]


def make_segments(seed, b, s, t, num_segments=3):
    """Packed-sequence ids: sorted segment ids per row, ``([B, S], [B, T])`` int32."""
    rng = np.random.default_rng(seed + 1)
    qs = np.sort(rng.integers(0, num_segments, (b, s)), axis=1).astype(np.int32)
    ks = np.sort(rng.integers(0, num_segments, (b, t)), axis=1).astype(np.int32)
    return jnp.asarray(qs), jnp.asarray(ks)
