"""Host-side schedules that tell the Pallas kernels which blocks to visit.

The layout is static, so the schedule is numpy computed once per layout (cached) and
handed to the kernel by scalar prefetch. The grid is static: one step per stored block,
plus one for each output block column that has no stored block (it must still be
written, with zeros).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from capibara.kernels.block_sparse.layout import BlockLayout

# Bits of Schedule.flags.
FIRST = 1  # first step of an output block: zero the accumulator
LAST = 2  # last step of an output block: write the accumulator out
VALID = 4  # the step multiplies a stored block (off for an empty output's single step)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Steps of a block-sparse product, grouped by output block column.

    All arrays are int32 ``[num_steps]``.

    Attributes:
      block_ids: index into ``blocks`` read at this step.
      in_ids: block column of the dense operand read at this step.
      out_ids: output block column written by this step.
      flags: ``FIRST | LAST | VALID`` bits.
    """

    block_ids: np.ndarray
    in_ids: np.ndarray
    out_ids: np.ndarray
    flags: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.flags)


def _schedule(block_ids, in_ids, out_ids, num_out: int) -> Schedule:
    """Builds the schedule from stored blocks already sorted by ``out_ids``.

    NOTE: an empty output gets one non-VALID step that re-reads the previous step's
    block and input tile: Pallas skips the copy when a block index repeats, so the
    step costs no memory traffic and never reads out of bounds.
    """
    steps: list[tuple[int, int, int, int]] = []
    pos = 0
    for out in range(num_out):
        end = pos
        while end < len(out_ids) and out_ids[end] == out:
            end += 1
        if end == pos:
            prev_block, prev_in = (steps[-1][0], steps[-1][1]) if steps else (0, 0)
            steps.append((prev_block, prev_in, out, FIRST | LAST))
        for i in range(pos, end):
            flags = VALID | (FIRST if i == pos else 0) | (LAST if i == end - 1 else 0)
            steps.append((int(block_ids[i]), int(in_ids[i]), out, flags))
        pos = end
    arr = np.asarray(steps, np.int32).reshape(-1, 4)
    return Schedule(*(np.ascontiguousarray(arr[:, i]) for i in range(4)))


@functools.cache
def forward_schedule(layout: BlockLayout) -> Schedule:
    """``x @ w``: output block column j accumulates ``x[:, row] @ blocks[b]``."""
    return _schedule(np.arange(layout.nnz), layout.rows, layout.cols, layout.grid[1])


@functools.cache
def transposed_schedule(layout: BlockLayout) -> Schedule:
    """``dy @ w.T``: output block column r accumulates ``dy[:, col] @ blocks[b].T``."""
    order = layout.row_major_order
    return _schedule(order, layout.cols[order], layout.rows[order], layout.grid[0])
