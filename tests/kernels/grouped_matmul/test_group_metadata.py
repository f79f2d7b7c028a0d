"""The Pallas schedule (``metadata.make_group_metadata``) against its invariants.

For any group sizes: at most ``tiles_m + E - 1`` steps are active; the active steps
list each (row tile, group) pair that shares a row exactly once, in order; every row
tile (forward) or every group (weight gradient) is visited; inactive steps repeat the
last active step's indices.
"""

from __future__ import annotations

import numpy as np
from gmm_inputs import group_sizes
from hypothesis import given, settings
from hypothesis import strategies as st

from capibara.kernels.grouped_matmul import metadata


@st.composite
def problems(draw):
    block_m = draw(st.sampled_from([8, 16, 32]))
    m = draw(st.integers(1, 6 * block_m))
    num_groups = draw(st.integers(1, 7))
    sizes = draw(group_sizes(m, num_groups))
    return m, block_m, sizes


def _expected_pairs(sizes, block_m):
    """Every (group, tile) whose rows intersect, in schedule order (plain Python)."""
    pairs, row = [], 0
    for g, size in enumerate(sizes):
        if size:
            pairs += [(g, t) for t in range(row // block_m, (row + size - 1) // block_m + 1)]
        row += size
    return pairs, row


@settings(max_examples=40, deadline=None, derandomize=True)
@given(problem=problems(), visit_empty_groups=st.booleans())
def test_schedule_invariants(problem, visit_empty_groups):
    m, block_m, sizes = problem
    m_padded = -(-m // block_m) * block_m
    tiles_m = m_padded // block_m
    meta = metadata.make_group_metadata(
        np.asarray(sizes, np.int32),
        m=m,
        m_padded=m_padded,
        block_m=block_m,
        visit_empty_groups=visit_empty_groups,
    )
    steps = metadata.num_steps(m_padded, block_m, len(sizes))
    group_ids, tile_ids = np.asarray(meta.group_ids), np.asarray(meta.m_tile_ids)
    active = int(meta.num_active[0])
    assert group_ids.shape == tile_ids.shape == (steps,)
    assert 1 <= active <= steps == tiles_m + len(sizes) - 1

    pairs, total = _expected_pairs(list(sizes), block_m)
    visited = list(zip(group_ids[:active].tolist(), tile_ids[:active].tolist(), strict=True))
    if visit_empty_groups:
        # Each group once or more, in order; an empty group exactly once.
        assert sorted(set(group_ids[:active].tolist())) == list(range(len(sizes)))
        assert [p for p in visited if sizes[p[0]]] == pairs
        empty = [g for g, _ in visited if not sizes[g]]
        assert empty == [g for g, size in enumerate(sizes) if not size]
        assert all(np.diff(group_ids[:active]) >= 0)
    else:
        # The intersecting pairs, then one step per row tile past the last group's rows.
        covered = -(-total // block_m)
        assert visited[: len(pairs)] == pairs
        assert [t for _, t in visited[len(pairs) :]] == list(range(covered, tiles_m))
        assert sorted(set(tile_ids[:active].tolist())) == list(range(tiles_m))
    assert all(np.diff(tile_ids[:active]) >= 0)  # a tile's visits are consecutive
    # Inactive steps repeat the last active one: no new block is fetched.
    assert (group_ids[active:] == group_ids[active - 1]).all()
    assert (tile_ids[active:] == tile_ids[active - 1]).all()
    assert ((tile_ids >= 0) & (tile_ids < tiles_m)).all()
