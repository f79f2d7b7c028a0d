"""Group metadata: where each group's rows are, and which (row tile, group) pairs to visit.

Everything here is ``jax.numpy`` on the traced ``group_sizes``, computed once per call
inside ``jit`` and handed to the Pallas kernels by scalar prefetch. Only the *number*
of grid steps is static: it is the bound ``tiles_m + num_groups - 1``, whatever the
sizes are; the steps past ``num_active`` are skipped by the kernel.

NOTE: bad values cannot raise under ``jit``, so they are clamped here, once, for
every implementation: a negative size counts as 0, and rows past ``m`` are dropped
(the groups that would own them end at ``m``). Hence ``0 <= starts <= ends <= m``
always holds, and no kernel reads or writes outside its operands.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """First and one-past-last row of every group, clamped to ``[0, m]``.

    Args:
      group_sizes: int32 ``[E]``; may hold bad values (negative, summing past ``m``).
      m: number of rows.

    Returns:
      ``(starts, ends)``, int32 ``[E]`` each, with ``0 <= starts <= ends <= m`` and
      ``starts[g + 1] == ends[g]``.
    """
    # Clamp each size to [0, m] before the cumsum so that it cannot overflow int32.
    sizes = jnp.clip(group_sizes.astype(jnp.int32), 0, m)
    ends = jnp.minimum(jnp.cumsum(sizes), m).astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


class GroupMetadata(NamedTuple):
    """The schedule of a grouped-matmul Pallas kernel (all int32, scalar prefetch).

    Attributes:
      starts, ends: ``[E]`` rows of each group (see ``group_bounds``).
      group_ids: ``[num_steps]`` group that grid step ``s`` works on.
      m_tile_ids: ``[num_steps]`` row tile that grid step ``s`` works on.
      num_active: ``[1]`` steps that do work; the rest repeat the last active step's
        indices (so they fetch nothing new) and are skipped with ``pl.when``.
    """

    starts: jax.Array
    ends: jax.Array
    group_ids: jax.Array
    m_tile_ids: jax.Array
    num_active: jax.Array


def num_steps(m_padded: int, block_m: int, num_groups: int) -> int:
    """The static grid length: ``tiles_m + num_groups - 1`` (the most visits possible)."""
    return m_padded // block_m + num_groups - 1


def make_group_metadata(
    group_sizes: jax.Array,
    *,
    m: int,
    m_padded: int,
    block_m: int,
    visit_empty_groups: bool,
) -> GroupMetadata:
    """Lists the (row tile, group) pairs a kernel visits, in order.

    Args:
      group_sizes: int32 ``[E]``.
      m: rows of the operand (groups are clamped to it).
      m_padded: rows after padding to a multiple of ``block_m``.
      block_m: the row tile.
      visit_empty_groups: ``False`` for ``grouped_matmul``: every *row tile* must be
        visited (rows owned by no group are written as zeros), empty groups need no
        step. ``True`` for ``transposed_grouped_matmul``: every *group* must be
        visited (an empty group's output is zeros), rows owned by no group need none.

    Returns:
      The ``GroupMetadata``; its step arrays have ``num_steps(...)`` entries.
    """
    num_groups = group_sizes.shape[0]
    tiles_m = m_padded // block_m
    total_steps = num_steps(m_padded, block_m, num_groups)
    starts, ends = group_bounds(group_sizes, m)

    # (1) The row tiles each group touches: [first_tile, last_tile], or none if empty.
    #
    # NOTE: consecutive groups share at most one tile (the one holding their
    # boundary), so the visits of the non-empty groups number at most
    # tiles_m + (non-empty groups) - 1, and m_tile_ids come out non-decreasing: a
    # tile's visits are consecutive steps, which keeps its output block resident.
    nonempty = ends > starts
    first_tile = starts // block_m
    last_tile = jnp.maximum(ends - 1, 0) // block_m
    visits = jnp.where(nonempty, last_tile - first_tile + 1, 0)
    if visit_empty_groups:
        # One step per empty group, with no rows, to zero its output. The bound still
        # holds: (tiles_m + nonempty - 1) + (E - nonempty), and E <= tiles_m + E - 1.
        visits = jnp.where(nonempty, visits, 1)
    num_visits = jnp.sum(visits)

    # (2) Step s -> (group, tile): group g owns steps [offset[g], offset[g] + visits[g]).
    step = jnp.arange(total_steps, dtype=jnp.int32)
    group_ids = jnp.repeat(
        jnp.arange(num_groups, dtype=jnp.int32), visits, total_repeat_length=total_steps
    )
    visit_offsets = jnp.cumsum(visits) - visits
    m_tile_ids = first_tile[group_ids] + step - visit_offsets[group_ids]

    if visit_empty_groups:
        num_active = num_visits
    else:
        # (3) Row tiles owned by no group (all past the last row of the last group)
        # still have to be written with zeros: one step each, on the last group,
        # whose rows all lie before these tiles, so the step's row mask is empty.
        covered = (ends[-1] + block_m - 1) // block_m
        zero_tiles = tiles_m - covered
        is_zero_step = step >= num_visits
        group_ids = jnp.where(is_zero_step, num_groups - 1, group_ids)
        m_tile_ids = jnp.where(is_zero_step, covered + step - num_visits, m_tile_ids)
        num_active = num_visits + zero_tiles

    # (4) Steps past the active ones repeat the last active step: the same blocks,
    # so the pipeline fetches nothing and the resident output is written back once.
    last = jnp.maximum(num_active - 1, 0)
    inactive = step > last
    group_ids = jnp.where(inactive, group_ids[last], group_ids)
    m_tile_ids = jnp.where(inactive, m_tile_ids[last], m_tile_ids)
    m_tile_ids = jnp.clip(m_tile_ids, 0, tiles_m - 1)
    return GroupMetadata(
        starts=starts,
        ends=ends,
        group_ids=group_ids.astype(jnp.int32),
        m_tile_ids=m_tile_ids.astype(jnp.int32),
        num_active=jnp.reshape(num_active, (1,)).astype(jnp.int32),
    )
