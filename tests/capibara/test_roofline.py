"""The ICI-bytes count of ``make bench K=sharding``'s roofline (``benchmarks/roofline.py``)
against hand-counted HLO lines, and its table against hand-computed bounds."""

from __future__ import annotations

from benchmarks import roofline

HLO = """
  %a = bf16[8,128]{1,0} all-reduce(bf16[8,128]{1,0} %x), replica_groups={{0,1}}
  %b = (f32[4,16]{1,0}, f32[2]{0}) all-gather-start(f32[1,16]{1,0} %y, f32[1]{0} %z)
  %c = f32[64]{0} reduce-scatter(f32[256]{0} %w), dimensions={0}
  %d = f32[1000]{0} add(f32[1000]{0} %p, f32[1000]{0} %q)
"""


def test_collective_bytes_counts_result_sizes_and_all_reduce_twice():
    all_reduce = 2 * (8 * 128 * 2)
    all_gather = 4 * 16 * 4 + 2 * 4
    reduce_scatter = 64 * 4
    assert roofline.collective_bytes(HLO) == all_reduce + all_gather + reduce_scatter


def test_the_estimate_is_the_largest_bound():
    row = {"flops": 275e12, "analytic_flops": 1.0, "hbm": 2 * 1200e9, "ici": 0.0, "params": 0.0}
    text = roofline.table({("m", roofline.TENSOR_PARALLEL): row})
    line = text.splitlines()[1].split()
    # t_flops 1000 ms, t_hbm 2000 ms, t_ici 0 ms: HBM bound at 2000 ms.
    assert line[-2:] == ["2000.0", "hbm"]
    assert "ESTIMATE" in text
