"""Decode matmul: a few rows times the ``small`` model's bf16 weights, f32 accumulation.

A decode step multiplies one row per sequence by every weight, so it is bound by how
fast the weights stream from memory. Each case chains several distinct weights (more
bytes than the L3 cache, as in a real step) and feeds every product back into the
next input, so the calls run one after another. Shapes: the MLP's up (768 -> 2048;
``[K, N]`` rows 4 KiB apart) and down (2048 -> 768) projections in both layouts, and
the tied vocab head (``table [32000, 768]``, ``w_transposed=True``), at 1, 8 and 32
rows.

Rows per case, in one process on the same weights: XLA's bf16 dot (the baseline),
``implementation=None`` (the native AVX512-BF16 kernel on CPU up to
``max_native_rows`` rows: 16 for ``[K, N]``, 64 for ``[N, K]``; XLA's dot beyond),
the native kernel forced (to show where the threshold sits), XLA's dot on the same
weights stored in f32 (2x the bytes), and
PyTorch's bf16 ``F.linear`` (oneDNN, what transformers runs). The note gives the
bytes moved per second (``bytes_accessed``: weights and x read, f32 y written; the
weights are nearly all of it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara import kernels
from capibara.kernels.decode_matmul import bytes_accessed, flops, max_native_rows, native

# name -> (K, N, w_transposed, number of chained weights). "kn": w [K, N] (the model's
# layout); "nk": w [N, K] (the serving engine's copy, and the tied vocab head).
SHAPES = {
    "up 768->2048 kn": (768, 2048, False, 24),
    "up 768->2048 nk": (768, 2048, True, 24),
    "down 2048->768 kn": (2048, 768, False, 24),
    "down 2048->768 nk": (2048, 768, True, 24),
    "head 768->32000 nk": (768, 32000, True, 2),
}
ROWS = [1, 8, 32]
CASES = [(s, m) for s in SHAPES for m in ROWS]
IDS = [f"{s.split()[0]}-{s.split()[-1]}-m{m}" for s, m in CASES]
FEEDBACK = 1e-3  # x <- x + FEEDBACK * y[:, :1]: each call depends on the previous one


@functools.cache
def problem(shape: str, m: int):
    """(x [m, K] bf16, weights (bf16 list), expected f32 [m, N])."""
    k, n, transposed, count = SHAPES[shape]
    rng = np.random.default_rng(0)
    w_shape = (n, k) if transposed else (k, n)
    weights = [
        jnp.asarray(rng.standard_normal(w_shape) / np.sqrt(k), jnp.bfloat16) for _ in range(count)
    ]
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    expected = chain("reference", transposed)(x, weights)
    return x, weights, expected


def chain(implementation, transposed, matmul=None):
    """jit of: for each weight, ``y = x @ w`` then ``x += FEEDBACK * y[:, :1]``."""

    def step(x, w):
        if matmul is not None:
            return matmul(x, w)
        return kernels.decode_matmul(x, w, w_transposed=transposed, implementation=implementation)

    @jax.jit
    def run(x, weights):
        for w in weights:
            y = step(x, w)
            x = x + (FEEDBACK * y[:, :1]).astype(x.dtype)
        return y

    return run


def _row(measure, benchmark, fn, args, shape, m, impl, *, weight_bytes=2, rounds=20, **kw):
    """One table row; ``weight_bytes``: bytes per weight (and x) element this row reads."""
    k, n, _, count = SHAPES[shape]
    _, _, expected = problem(shape, m)
    measure(
        fn,
        *args,
        op="decode_matmul",
        shape=f"{count} x {shape}, {m} rows",
        dtype="bf16",
        impl=impl,
        flops=count * flops(m, k, n),
        expected=expected,
        tol_dtype=jnp.bfloat16,
        rounds=rounds,
        **kw,
    )
    moved = count * bytes_accessed(m, k, n, weight_bytes)
    gbps = moved / benchmark.stats.stats.median / 1e9
    note = benchmark.extra_info.get("note", "")
    benchmark.extra_info["note"] = f"{gbps:.1f} GB/s" + (f"; {note}" if note else "")


@pytest.mark.parametrize("shape,m", CASES, ids=IDS)
def bench_xla(measure, benchmark, shape, m):
    x, weights, _ = problem(shape, m)
    transposed = SHAPES[shape][2]
    _row(
        measure,
        benchmark,
        chain("xla", transposed),
        (x, weights),
        shape,
        m,
        "xla dot",
        baseline=True,
    )


@pytest.mark.parametrize("shape,m", CASES, ids=IDS)
def bench_auto(measure, benchmark, shape, m):
    x, weights, _ = problem(shape, m)
    transposed = SHAPES[shape][2]
    if jax.default_backend() == "cpu" and native.available() and m <= max_native_rows(transposed):
        note = "cpu default (native)"
    else:
        note = f"{jax.default_backend()} default (xla)"
    _row(measure, benchmark, chain(None, transposed), (x, weights), shape, m, "auto", note=note)


@pytest.mark.skipif(not native.available(), reason="native kernel unavailable here")
@pytest.mark.parametrize("shape,m", CASES, ids=IDS)
def bench_native(measure, benchmark, shape, m):
    x, weights, _ = problem(shape, m)
    transposed = SHAPES[shape][2]
    _row(measure, benchmark, chain("native", transposed), (x, weights), shape, m, "native")


@pytest.mark.parametrize("shape,m", CASES, ids=IDS)
def bench_xla_f32_weights(measure, benchmark, shape, m):
    x, weights, _ = problem(shape, m)
    transposed = SHAPES[shape][2]
    weights32 = [w.astype(jnp.float32) for w in weights]

    def f32_dot(x, w):  # x stays bf16 between calls, as in every other row
        return kernels.decode_matmul(
            x.astype(jnp.float32), w, w_transposed=transposed, implementation="xla"
        )

    fn = chain(None, transposed, matmul=f32_dot)
    _row(measure, benchmark, fn, (x, weights32), shape, m, "xla dot, f32 weights", weight_bytes=4)


@pytest.mark.parametrize("shape,m", CASES, ids=IDS)
def bench_torch(measure, benchmark, shape, m):
    torch = pytest.importorskip("torch", reason="torch is in the bench extra")
    x, weights, _ = problem(shape, m)
    transposed = SHAPES[shape][2]
    as_torch = lambda a: torch.from_numpy(np.asarray(a, np.float32)).to(torch.bfloat16)
    # F.linear takes w as [N, K]
    tw = [as_torch(w if transposed else w.T).contiguous() for w in weights]
    tx = as_torch(x)

    def run(_x, _w):
        with torch.no_grad():
            h = tx
            for w in tw:
                y = torch.nn.functional.linear(h, w)
                h = h + (FEEDBACK * y[:, :1].float()).to(torch.bfloat16)
            return y.float().numpy()

    _row(
        measure,
        benchmark,
        run,
        (None, None),
        shape,
        m,
        "torch F.linear",
        note=f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        peer=True,
    )
