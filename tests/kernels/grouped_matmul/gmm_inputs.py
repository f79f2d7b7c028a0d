"""Shared inputs and helpers for the grouped matmul tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from capibara.kernels.grouped_matmul import BlockSizes

# Small tiles: interpret-mode shapes stay small yet span several row tiles, so that
# groups straddle tiles, share tiles, and skip tiles.
BLOCKS = BlockSizes(block_m=16, block_k=128, block_n=128)

IMPLS = [pytest.param("xla", id="xla"), pytest.param("pallas", id="pallas-interpret")]
DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")]


def call(fn, impl: str, **kwargs):
    """``fn`` bound to one implementation (Pallas in the TPU interpreter, small tiles)."""
    return functools.partial(
        fn, implementation=impl, interpret=impl == "pallas", block_sizes=BLOCKS, **kwargs
    )


def operands(seed, m, k, n, num_groups, dtype=jnp.float32, transpose_rhs=False):
    """Seeded unit normals ``lhs [m, k]``, ``rhs [E, k, n]`` (``[E, n, k]``), ``dy [m, n]``."""
    rng = np.random.default_rng(seed)
    rhs_shape = (num_groups, n, k) if transpose_rhs else (num_groups, k, n)
    shapes = [(m, k), rhs_shape, (m, n)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def forward_and_vjp(fn, lhs, rhs, cotangent, **kwargs):
    """``(fn(lhs, rhs), d lhs, d rhs)`` for the cotangent ``cotangent``."""
    out, pullback = jax.vjp(lambda a, b: fn(a, b, **kwargs), lhs, rhs)
    return (out, *pullback(cotangent))


def scale(*dims) -> float:
    """Magnitude of a dot of unit normals over the longest of ``dims`` (for tolerances)."""
    return float(np.sqrt(max(max(dims), 1)))


@st.composite
def group_sizes(draw, m: int, num_groups: int):
    """int32 ``[num_groups]`` with ``sum <= m``: empty groups, one group holding every
    row, zero rows in total and partial tiles all come up."""
    kind = draw(st.sampled_from(["random", "one-group", "empty", "random"]))
    if kind == "empty":
        return np.zeros(num_groups, np.int32)
    total = draw(st.sampled_from([m, m, draw(st.integers(0, m))]))
    if kind == "one-group":
        sizes = np.zeros(num_groups, np.int32)
        sizes[draw(st.integers(0, num_groups - 1))] = total
        return sizes
    cuts = sorted(
        draw(st.lists(st.integers(0, total), min_size=num_groups - 1, max_size=num_groups - 1))
    )
    return np.diff(np.asarray([0, *cuts, total])).astype(np.int32)
