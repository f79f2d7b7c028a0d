"""MoE block (router + permute + SwiGLU experts on grouped_matmul + unpermute).

Mixtral-like CPU shape of the grouped-matmul benchmark: t = 2048 tokens, top-2 of 8
experts (4096 routed rows), d = 1024, ffn = 2048, f32, dropless token-choice routing.
Rows per pass (forward, forward+backward), in one process:

* ``dense reference`` (baseline): the same block with every expert evaluated on every
  token and masked by the routing (``MoEBlock.reference``): E/k = 4x the expert FLOPs;
* ``auto``: ``MoEBlock`` with ``implementation=None`` (what the model runs).

GFLOP/s count the useful (routed) work: ``t·k·6·d·f`` for the experts plus ``2·t·d·E``
for the router; forward+backward is 3x. The note gives the router's own time (its
forward, or forward+backward) as a fraction of the block's, measured in the same run.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capibara.core.routing import MoEBlock, MoEBlockConfig, RoutingContext, TokenRouterConfig

T, TOP_K, E, D, FFN = 2048, 2, 8, 1024, 2048
SHAPE = f"t={T} top{TOP_K}/E{E} d={D} f={FFN}"
FORWARD_FLOPS = T * TOP_K * 6 * D * FFN + 2 * T * D * E
TRAIN = RoutingContext(training=True)

_problem_cache: dict[str, object] = {}


def _problem():
    """(graphdef, state, x, cotangent), built once per process."""
    if not _problem_cache:
        config = MoEBlockConfig(
            d_model=D, ffn_dim=FFN, router=TokenRouterConfig(num_experts=E, top_k=TOP_K)
        )
        graphdef, state = nnx.split(MoEBlock(config, rngs=nnx.Rngs(0)))
        keys = jax.random.split(jax.random.key(1), 2)
        x = jax.random.normal(keys[0], (T, D), jnp.float32)
        cotangent = jax.random.normal(keys[1], (T, D), jnp.float32)
        _problem_cache.update(graphdef=graphdef, state=state, x=x, cotangent=cotangent)
    c = _problem_cache
    return c["graphdef"], c["state"], c["x"], c["cotangent"]


def _forward_fn(reference: bool):
    graphdef, *_ = _problem()

    def forward(state, x):
        block = nnx.merge(graphdef, state)
        y, _ = (block.reference if reference else block)(x)
        return y

    return jax.jit(forward)


def _train_fn(reference: bool):
    """Gradients of ``<y, cotangent> + aux losses`` w.r.t. every parameter and ``x``."""
    graphdef, *_ = _problem()

    def loss(state, x, cotangent):
        block = nnx.merge(graphdef, state)
        y, routing = (block.reference if reference else block)(x, TRAIN)
        return jnp.sum(y * cotangent) + routing.total_aux_loss()

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _router_fns():
    """(router forward, router forward+backward, router state): the router's own work.

    The router is split out of the block so that its gradient is not also a zero
    gradient for every expert weight (which would time zero-filling 200 MB).
    """
    graphdef, state, *_ = _problem()
    router_graphdef, router_state = nnx.split(nnx.merge(graphdef, state).router)

    def weights(router_state, x, context=None):
        routing = nnx.merge(router_graphdef, router_state).route(x, context)
        return routing.weights, routing.total_aux_loss()

    def router_loss(router_state, x, cotangent):
        w, aux = weights(router_state, x, TRAIN)
        return jnp.sum(w * cotangent) + aux

    return jax.jit(weights), jax.jit(jax.grad(router_loss, argnums=(0, 1))), router_state


def _median_seconds(fn, args, rounds: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


_expected_cache: dict[str, object] = {}


def _expected(kind: str):
    """The dense reference's forward output or gradients (computed once)."""
    if kind not in _expected_cache:
        _, state, x, cotangent = _problem()
        if kind == "fwd":
            _expected_cache[kind] = _forward_fn(reference=True)(state, x)
        else:
            _expected_cache[kind] = _train_fn(reference=True)(state, x, cotangent)
    return _expected_cache[kind]


def _row(measure, benchmark, fn, args, kind: str, impl: str, **kw):
    measure(
        fn,
        *args,
        op=f"moe_block {kind}",
        shape=SHAPE,
        dtype="f32",
        impl=impl,
        flops=FORWARD_FLOPS * (1 if kind == "fwd" else 3),
        expected=_expected(kind),
        tol_dtype=jnp.float32,
        # Sums over d then ffn of unit-scale terms; gradients chain one more matmul.
        tol_scale=np.sqrt(FFN) * (1 if kind == "fwd" else 4),
        rounds=3,
        **kw,
    )


@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
def bench_dense_reference(measure, benchmark, kind):
    _, state, x, cotangent = _problem()
    if kind == "fwd":
        fn, args = _forward_fn(reference=True), (state, x)
    else:
        fn, args = _train_fn(reference=True), (state, x, cotangent)
    _row(measure, benchmark, fn, args, kind, "dense reference", baseline=True)
    benchmark.extra_info["note"] = f"every expert on every token ({E // TOP_K}x the expert FLOPs)"


@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
def bench_moe_block(measure, benchmark, kind):
    _, state, x, cotangent = _problem()
    router_forward, router_train, router_state = _router_fns()
    if kind == "fwd":
        fn, args = _forward_fn(reference=False), (state, x)
        router_seconds = _median_seconds(router_forward, (router_state, x))
    else:
        fn, args = _train_fn(reference=False), (state, x, cotangent)
        router_cotangent = jnp.ones((T, TOP_K), jnp.float32)
        router_seconds = _median_seconds(router_train, (router_state, x, router_cotangent))
    _row(measure, benchmark, fn, args, kind, "auto")
    block_seconds = benchmark.stats.stats.median
    backend = jax.default_backend()
    benchmark.extra_info["note"] = (
        f"{backend} default; router {router_seconds * 1e3:.2f} ms = "
        f"{router_seconds / block_seconds:.1%} of the block"
    )
