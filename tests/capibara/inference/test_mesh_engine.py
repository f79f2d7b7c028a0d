"""``EngineConfig(mesh=...)``: the engine on (1, 8) and (2, 4) meshes of 8 CPU devices gives
one device's greedy tokens, with continuous batching, the prefix cache and a cancelled
stream (the cases are in ``mesh_engine_cases.py``, run in a subprocess)."""

from __future__ import annotations

import pathlib

import jax
import pytest

from capibara.core.inference import EngineConfig

SCRIPT = pathlib.Path(__file__).with_name("mesh_engine_cases.py")


@pytest.fixture(scope="module")
def results(run_on_host_devices):
    return run_on_host_devices([str(SCRIPT)], devices=8, timeout=300)


@pytest.mark.parametrize("mesh", ["(1, 8)", "(2, 4)"])
def test_greedy_tokens_on_the_mesh_equal_one_device(results, mesh):
    assert results["devices"] == 8
    assert results[mesh]["same_tokens"] is True
    assert results[mesh]["same_tokens_beside_cancelled"] is True


@pytest.mark.parametrize("mesh", ["(1, 8)", "(2, 4)"])
def test_prefix_cache_and_cancellation_on_the_mesh(results, mesh):
    # Shared prompt prefixes were served from the cache (how many depends on when the
    # concurrent requests were admitted, so not an equality with one device's run).
    assert results["single_prefix_hit_rate"] > 0.2
    assert results[mesh]["prefix_hit_rate"] > 0.2
    assert results[mesh]["pages_lost"] == 0


def test_pools_split_over_kv_heads_where_they_divide(results):
    assert results["(2, 4)"]["pool_spec"] == "P('model',)"  # 4 kv heads on 4 shards
    assert results["(1, 8)"]["pool_spec"] == "P()"  # 4 kv heads, 8 shards: replicated
    assert results["(2, 4)"]["pool_devices"] == 8


def test_a_mesh_that_is_not_a_mesh_is_refused():
    expected = r"EngineConfig\.mesh must be a jax\.sharding\.Mesh or None, got \(2, 4\)"
    with pytest.raises(TypeError, match=expected):
        EngineConfig(mesh=(2, 4))
    assert EngineConfig(mesh=jax.sharding.Mesh(jax.devices()[:1], ("model",))).mesh is not None
