"""Expert parallelism (``capibara.kernels.moe.run_experts``): tokens exchanged between
expert shards give the single-device result, forward and gradients.

The mesh cases run in one subprocess with 8 simulated CPU devices
(``expert_parallel_cases.py``); argument checks run here on one device.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import pytest

from capibara.core.config import EXPERT_EXCHANGES
from capibara.core.moe import MoEBlockConfig
from capibara.core.token_routers import TokenRouterConfig
from capibara.kernels import grouped_matmul, moe

SCRIPT = pathlib.Path(__file__).with_name("expert_parallel_cases.py")
TOLERANCE = 2e-5  # f32, relative to the largest reference value


@pytest.fixture(scope="module")
def results(run_on_host_devices):
    return run_on_host_devices([str(SCRIPT)], devices=8, timeout=420)


def test_every_layout_and_exchange_equals_one_device(results):
    numeric = {k: v for k, v in results.items() if isinstance(v, float)}
    # 3 layouts x 2 exchanges x xla (+ interpret on (2, 2, 2)) x fwd/grads, plus the
    # default exchange, the warned fallback and the two MoE blocks.
    assert len(numeric) == 16 + 2 + 4, sorted(numeric)
    bad = {k: v for k, v in numeric.items() if not v <= TOLERANCE}
    assert not bad, bad


def test_tokens_stay_split_and_experts_stay_local(results):
    assert results["(2, 4) ragged_all_to_all xla out spec"] == "P(('data', 'expert'),)"
    assert results["(2, 2, 2) all_gather interpret out spec"] == "P(('data', 'expert'),)"
    assert results["(4, 2) all_gather xla weight grad spec"] == "P('expert', None, 'model')"


def test_the_ragged_form_exports_for_tpu(results):
    # Two exchanges per forward (there and back), their transposes in the backward.
    assert results["tpu export forward"] == "2 ragged_all_to_all, 2 mosaic, 8 devices"
    assert results["tpu export gradients"] == "4 ragged_all_to_all, 6 mosaic, 8 devices"
    assert results["emulation matches the docstring"] is True


def test_explicit_ragged_exchange_on_cpu_is_a_clear_error(results):
    message = results["explicit ragged on cpu"]
    assert "exchange='ragged_all_to_all' needs a TPU or GPU" in message
    assert "lowering for platform(s): cpu" in message


def test_experts_that_do_not_split_warn_and_stay_correct(results):
    assert results["6 experts on 4 shards warned"] is True


def _ffn(params, x_sorted, group_sizes):
    return grouped_matmul(x_sorted, params, group_sizes)


def test_bad_arguments_name_the_value():
    x, ids, w = jnp.ones((4, 8)), jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 2))
    with pytest.raises(ValueError, match="exchange='alltoall'"):
        moe.run_experts(x, ids, w, _ffn, jnp.ones((3, 8, 8)), num_experts=3, exchange="alltoall")
    with pytest.raises(ValueError, match=r"num_experts=4, got shape \(3, 8, 8\)"):
        moe.run_experts(x, ids, w, _ffn, jnp.ones((3, 8, 8)), num_experts=4)
    with pytest.raises(ValueError, match="expert_exchange='ring'"):
        router = TokenRouterConfig(num_experts=4, top_k=2)
        MoEBlockConfig(d_model=8, ffn_dim=8, router=router, expert_exchange="ring")


def test_without_a_mesh_it_is_permute_gmm_unpermute():
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (6, 8))
    ids = jax.random.randint(keys[1], (6, 2), 0, 3)
    w = jax.random.normal(keys[2], (3, 8, 8))
    weights = jnp.full((6, 2), 0.5)
    x_sorted, sizes, order = moe.permute(x, ids, 3)
    want = moe.unpermute(grouped_matmul(x_sorted, w, sizes), order, weights)
    got = moe.run_experts(x, ids, weights, _ffn, w, num_experts=3)
    assert jnp.array_equal(got, want)


def test_the_config_and_the_op_name_the_same_exchanges():
    assert EXPERT_EXCHANGES == moe.EXCHANGES
