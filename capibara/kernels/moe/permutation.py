"""Token permutation for routed experts: sort tokens by expert, then scatter results back.

    x_sorted, group_sizes, order = capibara.kernels.moe.permute(x, expert_ids, num_experts)
    h = capibara.kernels.grouped_matmul(x_sorted, w_up, group_sizes)           # every expert's rows
    ...
    y = capibara.kernels.moe.unpermute(out_sorted, order, router_weights)      # [t, d]

``permute`` copies each token once per chosen expert (``t * k`` rows), grouped by
expert in ascending order, which is the layout ``grouped_matmul`` expects.
``unpermute`` gathers each token's ``k`` rows back and sums them weighted by the
router. Both are differentiable (gathers; their transposes are scatter-adds).

Capacity: dropless by default. With ``capacity=C`` each expert keeps at most ``C``
rows and drops the rest *by position*, first choices before second choices: the
router's first choice of every token is served (in token order) before any token's
second choice, and so on. Dropped rows go to the end of ``x_sorted`` as zeros, out of
every group (so ``sum(group_sizes) < t * k`` and ``grouped_matmul`` leaves them
zero), contribute nothing in ``unpermute``, and are counted in ``order.num_dropped``.
An expert id outside ``[0, num_experts)`` is dropped the same way (ids are values:
they cannot raise under ``jit``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["Permutation", "permute", "unpermute"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Permutation:
    """Where ``permute`` put every (token, choice); what ``unpermute`` needs to undo it.

    Attributes:
      token_ids: int32 ``[t * k]``: the token each sorted row was copied from.
      positions: int32 ``[t, k]``: the sorted row holding (token, choice).
      kept: bool ``[t, k]``: False where the choice was dropped (over capacity, or
        an expert id out of range); its row is zero and outside every group.
      num_dropped: int32 ``[]``: how many choices were dropped.
    """

    token_ids: jax.Array
    positions: jax.Array
    kept: jax.Array
    num_dropped: jax.Array


def _validate_permute(x, expert_ids, num_experts, capacity) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must have rank 2 ([t, d]), got shape={x.shape}")
    if expert_ids.ndim != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"expert_ids must have shape [t, k] with t = x.shape[0] = {x.shape[0]}, "
            f"got shape={expert_ids.shape}"
        )
    if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise TypeError(f"expert_ids must be integers, got dtype={expert_ids.dtype}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if capacity is not None and (not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"capacity must be None or an int >= 0, got {capacity!r}")


def permute(
    x: jax.Array,
    expert_ids: jax.Array,
    num_experts: int,
    *,
    capacity: int | None = None,
) -> tuple[jax.Array, jax.Array, Permutation]:
    """Copies every token once per chosen expert and sorts the copies by expert.

    Args:
      x: ``[t, d]`` tokens.
      expert_ids: int ``[t, k]``: the ``k`` experts each token is routed to.
      num_experts: ``E``, the number of groups.
      capacity: ``None`` (dropless) or the most rows an expert keeps; the overflow is
        dropped by position, first choices first (see the module docstring).

    Returns:
      ``(x_sorted [t * k, d], group_sizes int32 [E], order)``: rows of expert ``g``
      are ``x_sorted[sum(group_sizes[:g]) : sum(group_sizes[:g + 1])]``, dropped rows
      (zeros) follow the last group; ``order`` is the ``Permutation`` for ``unpermute``.
    """
    _validate_permute(x, expert_ids, num_experts, capacity)
    t, k = expert_ids.shape
    rows = t * k
    flat = expert_ids.reshape(rows).astype(jnp.int32)
    # Priority order: all first choices in token order, then all second choices, ...
    # Flat index i * k + j is (token i, choice j).
    priority = jnp.arange(rows, dtype=jnp.int32).reshape(t, k).T.reshape(rows)
    expert = flat[priority]
    expert = jnp.where((expert >= 0) & (expert < num_experts), expert, num_experts)
    if capacity is not None:
        # Rank of each row among its expert's rows, in priority order (a stable sort
        # keeps priority order within an expert).
        by_expert = jnp.argsort(expert, stable=True)
        counts = jnp.bincount(expert, length=num_experts + 1)
        first_row = jnp.cumsum(counts) - counts
        sorted_rank = jnp.arange(rows, dtype=jnp.int32) - first_row[expert[by_expert]]
        rank = jnp.zeros(rows, jnp.int32).at[by_expert].set(sorted_rank)
        expert = jnp.where(rank < capacity, expert, num_experts)
    # Sorted row r holds flat index order[r]; dropped rows (expert == E) sort last.
    order = priority[jnp.argsort(expert, stable=True)]
    kept_flat = jnp.zeros(rows, bool).at[priority].set(expert < num_experts)
    token_ids = order // k
    x_sorted = jnp.where(kept_flat[order][:, None], x[token_ids], jnp.zeros((), x.dtype))
    group_sizes = jnp.bincount(expert, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    positions = jnp.zeros(rows, jnp.int32).at[order].set(jnp.arange(rows, dtype=jnp.int32))
    num_kept = jnp.sum(group_sizes)
    permutation = Permutation(
        token_ids=token_ids,
        positions=positions.reshape(t, k),
        kept=kept_flat.reshape(t, k),
        num_dropped=(rows - num_kept).astype(jnp.int32),
    )
    return x_sorted, group_sizes, permutation


def unpermute(y_sorted: jax.Array, order: Permutation, weights: jax.Array) -> jax.Array:
    """Sums each token's ``k`` expert outputs weighted by the router.

    Args:
      y_sorted: ``[t * k, d]`` expert outputs in ``permute``'s row order.
      order: the ``Permutation`` from ``permute``.
      weights: ``[t, k]`` router weights (dropped choices are ignored).

    Returns:
      ``[t, d]`` in ``y_sorted.dtype``: ``sum_j weights[i, j] * y_sorted[positions[i, j]]``,
      accumulated in f32.
    """
    if y_sorted.ndim != 2 or y_sorted.shape[0] != order.positions.size:
        raise ValueError(
            f"y_sorted must have shape [t * k, d] = [{order.positions.size}, d], "
            f"got shape={y_sorted.shape}"
        )
    if weights.shape != order.positions.shape:
        raise ValueError(
            f"weights must have shape [t, k] = {order.positions.shape}, got shape={weights.shape}"
        )
    rows = jnp.where(order.kept[..., None], y_sorted[order.positions], 0)  # [t, k, d]
    out = jnp.einsum(
        "tkd,tk->td",
        rows.astype(jnp.float32),
        weights.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return out.astype(y_sorted.dtype)
