"""pytest-benchmark glue shared by every ``bench_*.py`` module.

A benchmark case calls the ``measure`` fixture once. ``measure`` compiles and runs the
function, checks the result against the expected value *before* anything is timed,
then times it with ``benchmark.pedantic`` (warm-up round, median of ``rounds``) and
tags the stats with the table columns ``benchmarks/run.py`` prints.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from capibara.kernels.testing import assert_close, tolerance


def pytest_collection_modifyitems(items):
    """Runs the rows of one case next to each other: a module's ``bench_dense``,
    ``bench_auto``, ... for the same parameters follow one another, so the ratios in a
    table group are measured seconds apart, not minutes (machine load drifts). A stable
    sort by (file, parameter id) keeps the functions' order within a case."""

    def case(item):
        callspec = getattr(item, "callspec", None)
        return (str(item.path), callspec.id if callspec else "")

    items.sort(key=case)


def _ready(fn, args):
    return jax.block_until_ready(fn(*args))


@pytest.fixture
def measure(benchmark):
    def run(
        fn,
        *args,
        op: str,
        shape: str,
        dtype: str,
        impl: str,
        flops: float,
        expected=None,
        tol_dtype=None,
        tol_scale: float = 1.0,
        baseline: bool = False,
        rounds: int = 5,
        note: str = "",
        peer: bool = False,
        leaf_names: tuple[str, ...] = (),
    ):
        """Times ``fn(*args)`` and records one table row.

        Args:
          fn: jitted function; its output is compared with ``expected`` (if given).
          op, shape, dtype, impl: table columns; rows with the same (op, shape, dtype)
            form a group, compared against the group's ``baseline=True`` row.
          flops: useful floating-point operations of one call (for GFLOP/s).
          expected: reference output to check against before timing (pytree).
          tol_dtype, tol_scale: tolerance of the check (``capibara.kernels.testing``).
          note: free text shown in the table's last column.
          peer: another library's row: a failed check is reported in the note ("CHECK
            FAILED ...", naming each output that is off and by how much) and the row is
            still timed; our own rows fail the benchmark.
          leaf_names: names of the output's leaves for that note (default "output i").
        """
        out = _ready(fn, args)  # compile + first run
        if expected is not None:
            failures = []
            leaves = zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True)
            for i, (got, want) in enumerate(leaves):
                try:
                    assert_close(got, want, tol_dtype or dtype, scale=tol_scale, err_msg=impl)
                except AssertionError:
                    if not peer:
                        raise
                    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
                    name = leaf_names[i] if leaf_names else f"output {i}"
                    failures.append(f"{name} max err {float(np.max(np.abs(got - want))):.3g}")
            if failures:
                atol = tolerance(tol_dtype or dtype, scale=tol_scale)["atol"]
                failed = f"CHECK FAILED vs expected (atol {atol:.3g}): {', '.join(failures)}"
                note = f"{failed}; {note}".rstrip("; ")
        benchmark.group = f"{op} | {shape} | {dtype}"
        benchmark.extra_info.update(
            op=op,
            shape=shape,
            dtype=dtype,
            impl=impl,
            flops=float(flops),
            baseline=baseline,
            note=note,
        )
        benchmark.pedantic(_ready, args=(fn, args), rounds=rounds, warmup_rounds=1, iterations=1)
        return out

    return run
