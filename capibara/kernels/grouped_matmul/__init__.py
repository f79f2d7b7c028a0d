"""Grouped (ragged) matmul: the routed-expert products of a Mixture-of-Experts layer.

Rows of ``lhs`` are sorted by group (expert); group ``g`` owns the next
``group_sizes[g]`` rows and multiplies them by its own weights ``rhs[g]``:

    y = capibara.kernels.grouped_matmul(x_sorted, w, group_sizes)  # [m, k] x [E, k, n] -> [m, n]
    dw = capibara.kernels.transposed_grouped_matmul(x_sorted, dy, group_sizes)  # -> [E, k, n]

``grouped_matmul`` is differentiable in ``lhs`` and ``rhs``: ``d lhs`` is a grouped
matmul with the transposed weights and ``d rhs`` is ``transposed_grouped_matmul``,
both kernels (``ops.py``). ``capibara.kernels.moe.permute`` produces ``x_sorted`` and
``group_sizes`` from router choices.

Implementations (``implementation=``):
  * ``"reference"``: a loop over the groups, every row times every group, masked.
  * ``"xla"``: one 2-D dot per row chunk of each group (``xla.py``); the CPU/GPU default.
  * ``"pallas"``: Mosaic TPU kernels on a static grid of ``tiles_m + E - 1`` steps
    with the group schedule in scalar prefetch (``pallas_tpu.py``); the TPU default.
    ``interpret=True`` runs them in the Pallas TPU interpreter anywhere.

Bad group sizes: when ``group_sizes`` is a concrete array, negative sizes or sizes
summing past ``m`` raise ``ValueError``. Under ``jit`` only the values know, and every
implementation clamps instead (``metadata.group_bounds``): a negative size counts as
0 and the rows past ``m`` are dropped; nothing is read or written out of bounds.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from capibara.kernels import _mesh, _platform
from capibara.kernels.grouped_matmul import ops, reference
from capibara.kernels.grouped_matmul.pallas_tpu import BlockSizes

__all__ = [
    "BlockSizes",
    "bytes_accessed",
    "flops",
    "grouped_matmul",
    "lowering_cases",
    "transposed_grouped_matmul",
]


def flops(m: int, k: int, n: int) -> int:
    """Useful FLOPs of a grouped matmul over ``m`` grouped rows: ``2·m·k·n``.

    The same for ``transposed_grouped_matmul`` (``[m, k]ᵀ`` times ``[m, n]``); a
    forward plus backward pass is three times it.
    """
    return 2 * m * k * n


def bytes_accessed(m: int, k: int, n: int, num_groups: int, dtype) -> int:
    """Minimum HBM traffic of the forward: read ``lhs`` and every ``rhs[g]`` once, write ``out``."""
    return (m * k + num_groups * k * n + m * n) * jnp.dtype(dtype).itemsize


def _validate_group_sizes(group_sizes, num_groups: int | None, m: int) -> None:
    """Shape/dtype checks, and value checks when the sizes are concrete (not traced).

    ``num_groups`` is ``rhs.shape[0]`` for ``grouped_matmul``; ``None`` when the sizes
    define it (``transposed_grouped_matmul``).
    """
    if group_sizes.ndim != 1 or num_groups not in (None, group_sizes.shape[0]):
        expected = "[E]" if num_groups is None else f"[E] = [{num_groups}] (rhs.shape[0])"
        raise ValueError(f"group_sizes must have shape {expected}, got {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise TypeError(f"group_sizes must be int32, got dtype={group_sizes.dtype}")
    if group_sizes.shape[0] < 1:
        raise ValueError(f"need at least one group, got group_sizes.shape={group_sizes.shape}")
    if isinstance(group_sizes, jax.core.Tracer):
        return  # values unknown at trace time: the kernels clamp them
    sizes = np.asarray(group_sizes).astype(np.int64)
    if (sizes < 0).any():
        raise ValueError(f"group_sizes must be >= 0, got {sizes.tolist()}")
    if sizes.sum() > m:
        raise ValueError(
            f"group_sizes sum to {int(sizes.sum())}, more than the {m} rows of lhs: "
            f"{sizes.tolist()}"
        )


def _as_array(x):
    """Lists and tuples become numpy arrays (still concrete: their values get checked)."""
    return x if hasattr(x, "ndim") else np.asarray(x)


def _validate_operands(lhs, rhs, *, rhs_ndim: int) -> tuple[jax.Array, jax.Array]:
    """Checks ranks and dtypes; returns both operands in their promoted dtype (as
    ``jax.lax.ragged_dot`` promotes: bf16 x f32 -> f32)."""
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    if lhs.ndim != 2:
        raise ValueError(f"lhs must have rank 2 ([m, k]), got shape={lhs.shape}")
    if rhs.ndim != rhs_ndim:
        expected = "[E, k, n]" if rhs_ndim == 3 else "[m, n]"
        raise ValueError(f"rhs must have rank {rhs_ndim} ({expected}), got shape={rhs.shape}")
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got dtype={x.dtype}")
    dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    return lhs.astype(dtype), rhs.astype(dtype)


def _block_sizes(block_sizes: BlockSizes | None) -> BlockSizes:
    block_sizes = block_sizes or BlockSizes.get_default()
    if not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be BlockSizes, got {type(block_sizes).__name__}")
    return block_sizes


def _impls(op, reference_op, block_sizes, interpret):
    """``implementation name -> fn(lhs, rhs, group_sizes)`` for ``_platform.dispatch``."""
    return {
        backend: functools.partial(op, cfg=ops.OpConfig(backend, block_sizes, interpret))
        for backend in ("pallas", "xla")
    } | {"reference": reference_op}


def _first_row_of_shard(resolved, group_sizes, local_sizes) -> jax.Array:
    """The first row owned by this shard's experts (experts split over a mesh axis):
    the rows of all the groups before them."""
    first = _mesh.shard_offset(resolved, "experts", local_sizes.shape[0])
    return jnp.sum(jnp.where(jnp.arange(group_sizes.shape[0]) < first, group_sizes, 0))


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    split_k: bool = False,
    group_offset: jax.Array | int | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Rows of group ``g`` times ``rhs[g]``: ``[m, k] x [E, k, n] -> [m, n]``.

    Args:
      lhs: ``[m, k]``, rows sorted by group; f32/bf16 (f16 where the backend allows).
      rhs: ``[E, k, n]``, or ``[E, n, k]`` with ``transpose_rhs=True``. Another
        floating dtype than ``lhs`` is promoted with it (``jnp.promote_types``).
      group_sizes: int32 ``[E]``: group ``g`` owns rows
        ``[sum(group_sizes[:g]), sum(group_sizes[:g + 1]))``. Empty groups are fine;
        if the sizes sum to less than ``m`` the remaining rows come out as zeros.
        With ``group_offset``: ``[G]``, ``G >= E``, the sizes of all groups.
      group_offset: megablox's expert-parallel form: ``rhs`` holds groups
        ``[offset, offset + E)`` of the ``G`` in ``group_sizes``; their rows are
        computed, every other row is zero. An int or an integer ``[1]`` array (traced
        is fine).
      transpose_rhs: ``rhs`` is stored ``[E, n, k]`` and used transposed.
      split_k: under a mesh, split the contracted ``k`` over ``model`` (and ``psum``
        the output) instead of ``n``: the layout of a down projection whose weight and
        input are split along their features. No effect without a mesh.
      implementation: ``None`` (best for the platform, chosen at lowering),
        ``"pallas"``, ``"xla"`` or ``"reference"``.
      interpret: run the Pallas kernels in the Pallas TPU interpreter.
      block_sizes: ``BlockSizes`` of the Pallas kernels; ``None`` = default.

    Returns:
      ``[m, n]`` in the promoted dtype, accumulated in f32. Differentiable in ``lhs``
      and ``rhs``.
    """
    lhs, rhs = _validate_operands(lhs, rhs, rhs_ndim=3)
    if group_offset is not None:
        return _offset_groups(
            lhs,
            rhs,
            _as_array(group_sizes),
            group_offset,
            functools.partial(
                grouped_matmul,
                transpose_rhs=transpose_rhs,
                split_k=split_k,
                implementation=implementation,
                interpret=interpret,
                block_sizes=block_sizes,
            ),
        )
    num_groups = rhs.shape[0]
    k, n = (rhs.shape[2], rhs.shape[1]) if transpose_rhs else (rhs.shape[1], rhs.shape[2])
    if lhs.shape[1] != k:
        raise ValueError(
            f"lhs [m, k] and rhs {'[E, n, k]' if transpose_rhs else '[E, k, n]'} must share k, "
            f"got lhs.shape={lhs.shape}, rhs.shape={rhs.shape}, {transpose_rhs=}"
        )
    m = lhs.shape[0]
    group_sizes = _as_array(group_sizes)
    _validate_group_sizes(group_sizes, num_groups, m)
    block_sizes = _block_sizes(block_sizes)
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((m, n), lhs.dtype)

    def op(lhs, rhs, group_sizes, cfg):
        return ops.gmm(lhs, rhs, group_sizes, cfg, transpose_rhs)

    ref = functools.partial(reference.grouped_matmul, transpose_rhs=transpose_rhs)
    run = _platform.dispatch(
        "grouped_matmul", implementation, interpret, _impls(op, ref, block_sizes, interpret)
    )

    def per_expert_shard(resolved, lhs, rhs, group_sizes, local_sizes):
        # This shard's experts own one contiguous run of rows: roll it to the top, run
        # the local groups (the other rows come out zero), roll back, sum the shards.
        axis = resolved.get("experts")
        if axis is None:
            return run(lhs, rhs, local_sizes)
        offset = _first_row_of_shard(resolved, group_sizes, local_sizes)
        out = run(jnp.roll(lhs, -offset, axis=0), rhs, local_sizes)
        return jax.lax.psum(jnp.roll(out, offset, axis=0), axis)

    def per_shard(resolved, *args):
        # A k split leaves a partial sum on every shard of that axis.
        out = per_expert_shard(resolved, *args)
        if resolved.get("contract") is not None:
            out = jax.lax.psum(out, resolved["contract"])
        return out

    k_axis, n_axis = ("contract", None) if split_k else (None, "cols")
    w_axes = ("experts", n_axis, k_axis) if transpose_rhs else ("experts", k_axis, n_axis)
    return _mesh.run_per_shard(
        "grouped_matmul",
        lambda lhs, rhs, group_sizes, _: run(lhs, rhs, group_sizes),
        (lhs, rhs, group_sizes, group_sizes),
        ((None, k_axis), w_axes, (None,), ("experts",)),
        (None, n_axis),
        body=per_shard,
    )


def transposed_grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: str | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Per group ``lhs[rows of g].T @ rhs[rows of g]``: ``[m, k], [m, n] -> [E, k, n]``.

    The weight gradient of ``grouped_matmul`` (``lhs`` = its input, ``rhs`` = the
    output cotangent). Rows owned by no group contribute nothing; an empty group's
    result is zeros.

    Args:
      lhs: ``[m, k]``, rows sorted by group; f32/bf16.
      rhs: ``[m, n]``, ``lhs.dtype``.
      group_sizes: int32 ``[E]`` (as in ``grouped_matmul``).
      implementation, interpret, block_sizes: as in ``grouped_matmul``.

    Returns:
      ``[E, k, n]`` in the promoted dtype, accumulated in f32. Differentiable in both.
    """
    lhs, rhs = _validate_operands(lhs, rhs, rhs_ndim=2)
    if lhs.shape[0] != rhs.shape[0]:
        raise ValueError(
            f"lhs [m, k] and rhs [m, n] must share m, got lhs.shape={lhs.shape}, "
            f"rhs.shape={rhs.shape}"
        )
    (m, k), n = lhs.shape, rhs.shape[1]
    group_sizes = _as_array(group_sizes)
    _validate_group_sizes(group_sizes, None, m)
    num_groups = group_sizes.shape[0]
    block_sizes = _block_sizes(block_sizes)
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((num_groups, k, n), lhs.dtype)
    run = _platform.dispatch(
        "transposed_grouped_matmul",
        implementation,
        interpret,
        _impls(ops.tgmm, reference.transposed_grouped_matmul, block_sizes, interpret),
    )

    def per_expert_shard(resolved, lhs, rhs, group_sizes, local_sizes):
        # As in grouped_matmul: this shard's rows rolled to the top, its groups only.
        if resolved.get("experts") is None:
            return run(lhs, rhs, local_sizes)
        offset = _first_row_of_shard(resolved, group_sizes, local_sizes)
        roll = functools.partial(jnp.roll, shift=-offset, axis=0)
        return run(roll(lhs), roll(rhs), local_sizes)

    return _mesh.run_per_shard(
        "transposed_grouped_matmul",
        lambda lhs, rhs, group_sizes, _: run(lhs, rhs, group_sizes),
        (lhs, rhs, group_sizes, group_sizes),
        ((None, None), (None, "cols"), (None,), ("experts",)),
        ("experts", None, "cols"),
        body=per_expert_shard,
    )


def _offset_groups(lhs, rhs, group_sizes, group_offset, gmm) -> jax.Array:
    """Groups ``[offset, offset + E)`` of ``group_sizes [G]`` against ``rhs [E, ...]``:
    their rows rolled to the top, ``gmm`` on the local sizes, rolled back."""
    num_local = rhs.shape[0]
    if group_sizes.ndim != 1 or group_sizes.shape[0] < num_local:
        raise ValueError(
            f"with group_offset, group_sizes must be [G] with G >= rhs.shape[0] = "
            f"{num_local}, got shape {group_sizes.shape}"
        )
    num_groups = group_sizes.shape[0]
    if isinstance(group_offset, numbers.Integral):
        group_offset = np.asarray([group_offset])
    offset = jnp.reshape(jnp.asarray(group_offset), (-1,))
    if offset.shape != (1,) or not jnp.issubdtype(offset.dtype, jnp.integer):
        raise ValueError(
            f"group_offset must be an int or an integer [1] array, got shape "
            f"{jnp.shape(group_offset)} dtype {offset.dtype}"
        )
    if not isinstance(group_offset, jax.core.Tracer):
        value = int(np.asarray(group_offset).reshape(-1)[0])
        if not 0 <= value <= num_groups - num_local:
            raise ValueError(
                f"group_offset={value} must be in [0, {num_groups - num_local}] "
                f"(G={num_groups} groups, rhs holds {num_local})"
            )
    offset = offset[0].astype(jnp.int32)
    sizes = jnp.asarray(group_sizes, jnp.int32)
    first_row = jnp.sum(jnp.where(jnp.arange(num_groups) < offset, sizes, 0))
    local_sizes = jax.lax.dynamic_slice(sizes, (offset,), (num_local,))
    out = gmm(jnp.roll(lhs, -first_row, axis=0), rhs, local_sizes)
    return jnp.roll(out, first_row, axis=0)


def lowering_cases():
    """Forward (plain and ``transpose_rhs``), both gradients and the standalone
    ``transposed_grouped_matmul``, exported for TPU (see ``capibara.kernels.lowering``)."""
    from capibara.kernels.lowering import LoweringCase

    m, k, n, num_groups = 512, 256, 384, 4
    lhs = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((num_groups, k, n), jnp.bfloat16)
    rhs_t = jax.ShapeDtypeStruct((num_groups, n, k), jnp.bfloat16)
    dy = jax.ShapeDtypeStruct((m, n), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((num_groups,), jnp.int32)
    gmm = functools.partial(grouped_matmul, implementation="pallas")

    def forward_transposed(lhs, rhs_t, sizes):
        return gmm(lhs, rhs_t, sizes, transpose_rhs=True)

    def backward(lhs, rhs, sizes, dy):
        _, vjp = jax.vjp(lambda a, b: gmm(a, b, sizes), lhs, rhs)
        return vjp(dy)

    def weight_grad(lhs, dy, sizes):
        return transposed_grouped_matmul(lhs, dy, sizes, implementation="pallas")

    return [
        LoweringCase("grouped_matmul.forward", gmm, (lhs, rhs, sizes)),
        LoweringCase(
            "grouped_matmul.forward(transpose_rhs)", forward_transposed, (lhs, rhs_t, sizes)
        ),
        LoweringCase("grouped_matmul.backward(dlhs,drhs)", backward, (lhs, rhs, sizes, dy)),
        LoweringCase("grouped_matmul.transposed", weight_grad, (lhs, dy, sizes)),
    ]
