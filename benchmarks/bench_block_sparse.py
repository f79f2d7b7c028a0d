"""Block-sparse matmul: x [2048, 4096] @ w [4096, 4096], 128x128 blocks.

Rows per (density, dtype), all in one process: the dense XLA matmul of the same shape
(baseline), ``implementation=None`` (what a user gets), the blocked XLA path alone
(``xla-blocked``: no dense fallback, to show where it wins), torch's BSR matmul on CPU,
and on TPU the Pallas kernel. GFLOP/s count useful work only: 2·M·bk·bn per stored block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara import kernels
from capibara.kernels.block_sparse import BlockSparseMatrix, flops, xla

M, K, N, BLOCK = 2048, 4096, 4096, (128, 128)
DENSITIES = [1.0, 0.5, 0.3438, 0.1, 0.05]
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
SHAPE = f"{M}x{K}@{K}x{N} b128"


@functools.cache
def problem(density: float, dtype_name: str):
    """(x, w_sparse, w_dense, expected) for one row group; built once per process."""
    rng = np.random.default_rng(0)
    w_np = rng.standard_normal((K, N)).astype(np.float32)
    w = BlockSparseMatrix.prune(w_np, 1.0 - density, BLOCK).astype(DTYPES[dtype_name])
    x = jnp.asarray(rng.standard_normal((M, K)), DTYPES[dtype_name])
    w_dense = w.to_dense()
    expected = kernels.block_sparse_matmul(x, w, implementation="reference")
    return x, w, w_dense, expected


def _row(measure, fn, args, density, dtype_name, impl, **kw):
    _, w, _, expected = problem(density, dtype_name)
    measure(
        fn,
        *args,
        op="block_sparse_matmul",
        shape=f"{SHAPE} d={w.density:.4f}",
        dtype=dtype_name,
        impl=impl,
        flops=flops(M, w),
        expected=expected,
        tol_dtype=DTYPES[dtype_name],
        tol_scale=np.sqrt(K) * (4 if dtype_name == "bf16" else 1),
        **kw,
    )


CASES = [(d, t) for t in DTYPES for d in DENSITIES]
IDS = [f"{t}-d={d}" for d, t in CASES]


@pytest.mark.parametrize("density,dtype_name", CASES, ids=IDS)
def bench_dense_xla(measure, density, dtype_name):
    x, _, w_dense, _ = problem(density, dtype_name)
    f = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    _row(measure, f, (x, w_dense), density, dtype_name, "dense xla", baseline=True)


@pytest.mark.parametrize("density,dtype_name", CASES, ids=IDS)
def bench_auto(measure, density, dtype_name):
    x, w, _, _ = problem(density, dtype_name)
    route = "dense route" if xla.dense_is_faster(w.layout, x.dtype) else "blocked"
    note = f"{jax.default_backend()} default ({route})" if jax.default_backend() == "cpu" else ""
    _row(
        measure,
        jax.jit(kernels.block_sparse_matmul),
        (x, w),
        density,
        dtype_name,
        "auto",
        note=note,
    )


@pytest.mark.parametrize("density,dtype_name", CASES, ids=IDS)
def bench_xla_blocked(measure, density, dtype_name):
    x, w, _, _ = problem(density, dtype_name)
    f = jax.jit(lambda x, blocks: xla.matmul(x, blocks, w.layout).astype(x.dtype))
    _row(measure, f, (x, w.blocks), density, dtype_name, "xla-blocked", rounds=3)


@pytest.mark.parametrize("density,dtype_name", CASES, ids=IDS)
def bench_torch_bsr(measure, density, dtype_name):
    torch = pytest.importorskip("torch", reason="torch is in the bench extra")
    x, _, w_dense, _ = problem(density, dtype_name)
    tdtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    # torch multiplies BSR @ dense, so compute (w.T @ x.T).T with w.T in BSR form.
    wt = torch.from_numpy(np.asarray(w_dense, np.float32).T.copy()).to(tdtype)
    try:
        wt_bsr = wt.to_sparse_bsr(BLOCK)
        xt = torch.from_numpy(np.asarray(x, np.float32).T.copy()).to(tdtype)
        (wt_bsr @ xt[:, :8]).float()  # probe: is this dtype supported?
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch BSR matmul unsupported for {dtype_name}: {e}")

    def run(_):
        with torch.no_grad():
            return (wt_bsr @ xt).T.float().numpy()

    _row(
        measure,
        run,
        (None,),
        density,
        dtype_name,
        "torch bsr",
        rounds=3,
        note=f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        peer=True,
    )


@pytest.mark.skipif(
    jax.default_backend() != "tpu", reason="the Pallas kernel is compiled on TPU only"
)
@pytest.mark.parametrize("density,dtype_name", CASES, ids=IDS)
def bench_pallas(measure, density, dtype_name):
    x, w, _, _ = problem(density, dtype_name)
    f = jax.jit(functools.partial(kernels.block_sparse_matmul, implementation="pallas"))
    _row(measure, f, (x, w), density, dtype_name, "pallas")
