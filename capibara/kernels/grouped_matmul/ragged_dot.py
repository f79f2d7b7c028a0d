"""``ragged_dot``: ``jax.lax.ragged_dot``'s contract, run by ``grouped_matmul``.

    y = capibara.kernels.ragged_dot(lhs, rhs, group_sizes)   # a change of import

Same arguments, shapes and dtype rules as ``jax.lax.ragged_dot``:

* ``lhs [m, k]`` and ``rhs [g, k, n]`` of any floating dtypes are promoted together
  (``jnp.promote_types``); the result has ``preferred_element_type`` if given, else the
  promoted dtype. The products accumulate in f32 whatever ``precision`` asks (it is
  validated, and never lower than asked). A ``preferred_element_type`` wider than the
  inputs (bf16 in, f32 out) runs the product on the inputs upcast to it, which is
  exact: a bf16 x bf16 product fits f32, so this equals an f32-accumulated bf16 dot
  without the output rounding to bf16 first.
* ``group_offset`` (megablox's expert-parallel form, ``grouped_matmul``'s): ``group_sizes
  [G]`` sizes all ``G >= g`` groups, ``rhs`` holds groups ``[offset, offset + g)``; the
  rows of those groups are computed, every other row is zero. (``jax.lax.ragged_dot``
  0.10.2 raises on a ``group_offset`` array; the tests compare with a per-group
  reference.)

Where it differs from ``jax.lax.ragged_dot``, on purpose:

* an empty group's weights are never read: NaN or Inf in ``rhs[g]`` of a group with no
  rows does not reach the output (``jax.lax.ragged_dot`` multiplies every row by every
  group and masks, so it leaks);
* ``jax.vmap`` with unbatched weights keeps ``rhs`` unbatched (inherited from
  ``grouped_matmul``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from capibara.kernels.grouped_matmul import grouped_matmul

__all__ = ["ragged_dot"]


def ragged_dot(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    precision=None,
    preferred_element_type=None,
    group_offset: jax.Array | None = None,
    *,
    implementation: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Rows of group ``i`` times ``rhs[i]``: ``[m, k] x [g, k, n] -> [m, n]``.

    Args:
      lhs: ``[m, k]``, rows sorted by group; floating point.
      rhs: ``[g, k, n]``; floating point (promoted with ``lhs``).
      group_sizes: integer ``[g]`` (``[G]``, ``G >= g``, with ``group_offset``).
      precision: as ``jax.lax.dot``'s; accumulation is f32 at every setting.
      preferred_element_type: the result dtype (default: the promoted input dtype).
      group_offset: optional integer ``[1]`` (or scalar): the first group ``rhs`` holds.
      implementation, interpret: as in ``grouped_matmul`` (``None``: best here).

    Returns:
      ``[m, n]``; rows outside the computed groups are zero.
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)  # shapes and dtypes: grouped_matmul checks
    _check_precision(precision)
    dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"ragged_dot: lhs and rhs must be floating point, got {dtype}")
    out_dtype = jnp.dtype(preferred_element_type) if preferred_element_type is not None else dtype
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise TypeError(
            f"ragged_dot: preferred_element_type must be floating point, got {out_dtype}"
        )
    if jnp.finfo(out_dtype).bits > jnp.finfo(dtype).bits:
        dtype = out_dtype  # exact: see the module docstring
    out = grouped_matmul(
        lhs.astype(dtype),
        rhs.astype(dtype),
        group_sizes,
        group_offset=group_offset,
        implementation=implementation,
        interpret=interpret,
    )
    return out.astype(out_dtype)


def _check_precision(precision) -> None:
    """Raises what ``jax.lax.dot`` raises for a ``precision`` it does not accept."""
    one = jax.ShapeDtypeStruct((1, 1), jnp.float32)
    jax.eval_shape(functools.partial(jax.lax.dot, precision=precision), one, one)
