"""Grouped matmul: the routed-expert product of a Mixtral-shaped MoE layer on CPU.

t = 2048 tokens, top-2 of 8 experts -> m = 4096 routed rows, d = 1024, ffn = 2048:
``[4096, 1024] x [8, 1024, 2048] -> [4096, 2048]``, f32 and bf16, with balanced
routing (512 rows per expert) and a skewed one (half the rows on expert 0). Rows per
(pass, routing, dtype), measured back to back in one process, in this order:

* ``jax.lax.ragged_dot`` and ``tokamax ragged_dot (xla)``: the peers;
* ``every-expert einsum``: every token through every expert (``E/k = 4x`` the
  FLOPs), then each routed row picked out -- the dense MoE formulation;
* ``dense same-FLOPs`` (baseline): one ``[4096, 1024] @ [1024, 2048]`` matmul, the
  same FLOPs as the routed work -- the practical ceiling;
* ``capibara xla``: ``grouped_matmul(implementation="xla")``, the CPU default; its
  note gives its speed-up over each peer above and its share of the dense matmul's
  speed measured *paired* (the two alternated, median of the per-pair ratios), which
  holds still on a loaded machine where the rows' own medians drift (on TPU a
  ``capibara pallas`` row follows).

GFLOP/s count the routed work, ``2·m·d·ffn`` (forward) and 3x that (forward+backward,
gradients of both operands). Every row's result is checked against the reference
(a loop over experts) before it is timed.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokamax

from capibara.kernels.grouped_matmul import flops, grouped_matmul

T, TOP_K, E, D, FFN = 2048, 2, 8, 1024, 2048
M = T * TOP_K
ROUTINGS = {
    "balanced": [M // E] * E,
    "skewed": [M // 2] + [293] * (E - 2) + [M // 2 - 293 * (E - 2)],
}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
PASSES = ("fwd", "fwd+bwd")
CASES = [(p, r, t) for p in PASSES for r in ROUTINGS for t in DTYPES]
ROUNDS = 3  # the slow peers; the dense baseline and capibara take 5

# (pass, routing, dtype) -> impl -> median seconds, filled as the rows run (peers
# first, capibara last, see ROWS) so that capibara's note can compare against them.
_medians: dict[tuple[str, str, str], dict[str, float]] = {}


@functools.cache
def problem(routing: str, dtype_name: str):
    """Operands of one row group, built once per process.

    Row r of ``lhs`` is token ``r % T`` (every token twice); rows are sorted by
    expert, so with either routing a token's two rows land in different experts.
    """
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(0)
    sizes = np.asarray(ROUTINGS[routing], np.int32)
    tokens = jnp.asarray(rng.standard_normal((T, D)), dtype)
    rhs = jnp.asarray(rng.standard_normal((E, D, FFN)) / np.sqrt(D), dtype)
    dy = jnp.asarray(rng.standard_normal((M, FFN)), dtype)
    token_of_row = np.arange(M) % T
    expert_of_row = np.repeat(np.arange(E), sizes)
    assert (expert_of_row[:T] != expert_of_row[T:]).all()
    return {
        "lhs": tokens[token_of_row],
        "tokens": tokens,
        "rhs": rhs,
        "dy": dy,
        "sizes": jnp.asarray(sizes),
        "token_of_row": jnp.asarray(token_of_row),
        "expert_of_row": jnp.asarray(expert_of_row),
    }


def _with_vjp(fn):
    """``(lhs, rhs, dy) -> (fn(lhs, rhs), d lhs, d rhs)``."""

    def run(lhs, rhs, dy):
        out, pullback = jax.vjp(fn, lhs, rhs)
        return (out, *pullback(dy))

    return run


@functools.cache
def expected(kind: str, routing: str, dtype_name: str):
    """The reference's output (``fwd``) or output and gradients (``fwd+bwd``)."""
    p = problem(routing, dtype_name)
    ref = functools.partial(grouped_matmul, implementation="reference")
    if kind == "fwd":
        return jax.jit(ref)(p["lhs"], p["rhs"], p["sizes"])
    return jax.jit(_with_vjp(lambda a, b: ref(a, b, p["sizes"])))(p["lhs"], p["rhs"], p["dy"])


def _row(measure, benchmark, fn, args, case, impl, *, expect=True, rounds=ROUNDS, **kw):
    kind, routing, dtype_name = case
    want = expected(kind, routing, dtype_name) if expect is True else expect
    measure(
        fn,
        *args,
        op=f"grouped_matmul {kind}",
        shape=f"m={M} d={D} f={FFN} E={E} {routing}",
        dtype=dtype_name,
        impl=impl,
        flops=flops(M, D, FFN) * (1 if kind == "fwd" else 3),
        expected=want,
        tol_dtype=DTYPES[dtype_name],
        # Outputs are O(1); weight gradients sum up to 2048 rows: O(sqrt(2048)).
        tol_scale=4 if kind == "fwd" else 64,
        rounds=rounds,
        **kw,
    )
    _medians.setdefault(case, {})[impl] = benchmark.stats.stats.median


def _grouped_call(case, matmul):
    """``(jitted fn, args)`` for ``matmul(lhs, rhs, group_sizes)``, or with its vjp."""
    kind, routing, dtype_name = case
    p = problem(routing, dtype_name)
    sizes = p["sizes"]
    if kind == "fwd":
        return jax.jit(matmul), (p["lhs"], p["rhs"], sizes)
    return jax.jit(_with_vjp(lambda a, b: matmul(a, b, sizes))), (p["lhs"], p["rhs"], p["dy"])


def _dense_call(case):
    """``(jitted fn, args)``: one ``[m, d] @ [d, ffn]`` matmul, the routed work's FLOPs."""
    kind, routing, dtype_name = case
    p = problem(routing, dtype_name)

    def dense(lhs, w):
        return jnp.dot(lhs, w, preferred_element_type=jnp.float32).astype(lhs.dtype)

    w = p["rhs"][0]
    if kind == "fwd":
        return jax.jit(dense), (p["lhs"], w)
    return jax.jit(_with_vjp(dense)), (p["lhs"], w, p["dy"])


def _grouped_row(measure, benchmark, case, impl, matmul, **kw):
    """A row for ``matmul(lhs, rhs, group_sizes) -> [m, n]`` (forward, or with its vjp)."""
    fn, args = _grouped_call(case, matmul)
    _row(measure, benchmark, fn, args, case, impl, **kw)


def _f32_accumulate(fn):
    """A peer called with f32 accumulation and cast back, as capibara does."""
    return lambda lhs, rhs, sizes: fn(lhs, rhs, sizes).astype(lhs.dtype)


def _dense_same_flops(measure, benchmark, case, impl):
    fn, args = _dense_call(case)
    _row(measure, benchmark, fn, args, case, impl, expect=None, baseline=True, rounds=5)


def _paired_ratio(fast, slow, rounds: int = 7) -> float:
    """Median over ``rounds`` of ``time(slow) / time(fast)``, each pair run back to back
    (alternating which goes first): robust to load drifting on a shared machine."""
    ratios = []
    for i in range(rounds):
        times = {}
        for name in ("fast", "slow") if i % 2 else ("slow", "fast"):
            fn, args = fast if name == "fast" else slow
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name] = time.perf_counter() - start
        ratios.append(times["slow"] / times["fast"])
    return statistics.median(ratios)


def _every_expert_einsum(measure, benchmark, case, impl):
    kind, routing, dtype_name = case
    p = problem(routing, dtype_name)
    expert_of_row, token_of_row = p["expert_of_row"], p["token_of_row"]

    def every_expert(tokens, rhs):  # [t, d] x [E, d, f] -> [E, t, f], then the routed rows
        y = jnp.einsum("td,edf->etf", tokens, rhs, preferred_element_type=jnp.float32)
        return y[expert_of_row, token_of_row].astype(tokens.dtype)

    want = expected(kind, routing, dtype_name)
    if kind == "fwd":
        fn, args = jax.jit(every_expert), (p["tokens"], p["rhs"])
    else:
        fn, args = jax.jit(_with_vjp(every_expert)), (p["tokens"], p["rhs"], p["dy"])
        out, d_lhs, d_rhs = want  # d tokens: the sum over each token's two rows
        d_tokens = jnp.zeros((T, D), jnp.float32).at[token_of_row].add(d_lhs.astype(jnp.float32))
        want = (out, d_tokens, d_rhs)
    note = f"{E // TOP_K}x the routed FLOPs"
    _row(measure, benchmark, fn, args, case, impl, expect=want, note=note)


def _jax_ragged_dot(measure, benchmark, case, impl):
    ragged = functools.partial(jax.lax.ragged_dot, preferred_element_type=jnp.float32)
    _grouped_row(measure, benchmark, case, impl, _f32_accumulate(ragged))


def _tokamax_ragged_dot(measure, benchmark, case, impl):
    ragged = functools.partial(
        tokamax.ragged_dot, preferred_element_type=jnp.float32, implementation="xla"
    )
    _grouped_row(measure, benchmark, case, impl, _f32_accumulate(ragged))


def _capibara(implementation):
    def run(measure, benchmark, case, impl):
        matmul = functools.partial(grouped_matmul, implementation=implementation)
        _grouped_row(measure, benchmark, case, impl, matmul, rounds=5)
        # The note: speed-up over each peer measured just before, in this run, and the
        # share of the dense matmul's speed measured pairwise (see _paired_ratio).
        medians = _medians[case]
        mine = medians[impl]
        ratios = [f"{medians[p] / mine:.1f}x {short}" for p, short in PEERS.items() if p in medians]
        paired = _paired_ratio(_grouped_call(case, matmul), _dense_call(case))
        ratios.append(f"{paired:.0%} of dense (paired)")
        benchmark.extra_info["note"] = "vs " + ", ".join(ratios)

    return run


DENSE = "dense same-FLOPs"
PEERS = {
    "jax.lax.ragged_dot": "ragged_dot",
    "tokamax ragged_dot (xla)": "tokamax",
    "every-expert einsum": "einsum",
}
# Row order within a group: the slow peers, then the dense baseline and capibara last
# and back to back, so that load drifting on a shared machine skews their ratio least.
ROWS = {
    "jax.lax.ragged_dot": _jax_ragged_dot,
    "tokamax ragged_dot (xla)": _tokamax_ragged_dot,
    "every-expert einsum": _every_expert_einsum,
    DENSE: _dense_same_flops,
    "capibara xla": _capibara("xla"),
}
if jax.default_backend() == "tpu":
    ROWS["capibara pallas"] = _capibara("pallas")
PARAMS = [(case, impl) for case in CASES for impl in ROWS]


@pytest.mark.parametrize(
    "case,impl", PARAMS, ids=[f"{'-'.join(case)}-{impl.replace(' ', '_')}" for case, impl in PARAMS]
)
def bench_grouped_matmul(measure, benchmark, case, impl):
    ROWS[impl](measure, benchmark, case, impl)
