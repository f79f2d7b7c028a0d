"""capibara.shard on 32 simulated CPU devices: same logits and gradients as one device.

The xla implementation and the Pallas kernels (interpret mode) both run under the
mesh; the kernels through their own ``shard_map`` rule (``capibara.kernels._mesh``).

XLA fixes the host device count when it starts, so the check runs in a subprocess
with ``--xla_force_host_platform_device_count=32``.
"""

from __future__ import annotations

import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from capibara.core.config import preset
    from capibara.core.model import CapibaraModel
    from capibara.sharding import batch_sharding, make_mesh, shard
    from capibara.training import next_token_loss

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16)), jnp.int32)

    def forward(model, toks):
        return nnx.jit(lambda m, t: m(t)[0])(model, toks)

    def loss_and_grads(model, toks):
        step = lambda m, t: nnx.value_and_grad(next_token_loss, has_aux=True)(m, t)
        (loss, _), grads = nnx.jit(step)(model, toks)
        return loss, grads

    def relative(a, b):
        return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    def sharded(config, shape, axes=("data", "model")):
        model = CapibaraModel(config, rngs=nnx.Rngs(0))
        mesh = make_mesh(shape, axes)
        specs = shard(model, mesh)
        return model, specs, jax.device_put(tokens, batch_sharding(mesh))

    def placement(model, specs):
        up = model.stack.layers[0].mlp.w_gate_up.get_value()
        q = model.stack.layers[0].self_attn.q_proj.kernel.get_value()
        return {
            "q_proj_spec": [str(a) for a in specs["stack.layers.0.self_attn.q_proj.kernel"]],
            "q_proj_shard_shape": list(q.addressable_shards[0].data.shape),
            "w_gate_up_shard_shape": list(up.addressable_shards[0].data.shape),
            "q_proj_devices": len(q.sharding.device_set),
        }

    # One device, xla: the reference of every run below. The interpret-mode kernels on
    # the mesh are compared with it too: another implementation, not just another layout.
    xla = preset("tiny-moe", implementation="xla")
    one = CapibaraModel(xla, rngs=nnx.Rngs(0))
    logits_one = forward(one, tokens)
    loss_one, grads_one = loss_and_grads(one, tokens)
    results = {"devices": len(jax.devices())}

    # The xla forward on two more layouts, the expert axis included ((4, 8) is below,
    # with gradients).
    for shape, axes in [((2, 4), ("data", "model")), ((2, 2, 2), ("data", "model", "expert"))]:
        model, specs, toks = sharded(xla, shape, axes)
        results[str(shape)] = {
            "max_diff": float(jnp.max(jnp.abs(forward(model, toks) - logits_one))),
            **placement(model, specs),
        }

    # Pallas (interpret mode) and xla under the mesh, forward and gradients, through
    # the ops' own shard_map rule: nothing here calls shard_map.
    interpret = preset("tiny-moe", implementation=None, interpret_kernels=True)
    for name, config, shape in [("interpret", interpret, (2, 4)), ("xla", xla, (4, 8))]:
        model, specs, toks = sharded(config, shape)
        logits = forward(model, toks)
        loss, grads = loss_and_grads(model, toks)
        params = jax.tree.leaves(nnx.state(model, nnx.Param))
        device0 = jax.devices()[0]
        results[f"{name} {shape}"] = {
            "logits": float(jnp.max(jnp.abs(logits - logits_one))),
            "loss": float(abs(loss - loss_one) / abs(loss_one)),
            "grads": relative(grads, grads_one),
            "logits_spec": [str(a) for a in logits.sharding.spec],
            "param_bytes": sum(p.nbytes for p in params),
            "param_bytes_device0": sum(
                s.data.nbytes for p in params for s in p.addressable_shards
                if s.device == device0
            ),
        }
        if name == "xla":
            results[str(shape)] = {
                "max_diff": results[f"{name} {shape}"]["logits"], **placement(model, specs)
            }

    # Block-sparse MLP kernels stored in 8 column shards, split over "model" on (4, 8):
    # the same logits as the unsplit sparse model on one device.
    from capibara.sparsity import sparsify

    config = preset("tiny", implementation="xla")
    whole = CapibaraModel(config, rngs=nnx.Rngs(0))
    sparsify(whole, 0.5, (16, 16))
    model = CapibaraModel(config, rngs=nnx.Rngs(0))
    report = sparsify(model, 0.5, (16, 16), column_shards=8)
    mesh = make_mesh((4, 8))
    specs = shard(model, mesh)
    logits = forward(model, jax.device_put(tokens, batch_sharding(mesh)))
    gate = model.stack.layers[0].mlp.gate_proj.kernel.get_value()
    results["sparse columns"] = {
        "max_diff": float(jnp.max(jnp.abs(logits - forward(whole, tokens)))),
        "column_sharded": list(report.column_sharded),
        "gate_spec": str(specs["stack.layers.0.mlp.gate_proj.kernel"]),
        "gate_blocks": [gate.shape[0], gate.addressable_shards[0].data.shape[0]],
    }
    print("RESULT" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def results(run_on_host_devices):
    return run_on_host_devices(["-c", SCRIPT], devices=32, timeout=480)


def test_runs_on_32_devices(results):
    assert results["devices"] == 32


@pytest.mark.parametrize("mesh", ["(4, 8)", "(2, 4)", "(2, 2, 2)"])
def test_sharded_logits_equal_one_device(results, mesh):
    assert results[mesh]["max_diff"] <= 1e-4


def test_parameters_are_really_split(results):
    # q_proj [64, 64]: output dim over "model"; the tiny-moe experts [4, 64, 256].
    assert results["(4, 8)"]["q_proj_spec"] == ["None", "model"]
    assert results["(4, 8)"]["q_proj_shard_shape"] == [64, 8]
    assert results["(4, 8)"]["q_proj_devices"] == 32
    assert results["(2, 4)"]["q_proj_shard_shape"] == [64, 16]
    assert results["(2, 2, 2)"]["w_gate_up_shard_shape"] == [2, 64, 128]


@pytest.mark.parametrize("run", ["interpret (2, 4)", "xla (4, 8)"])
def test_forward_and_gradients_on_the_mesh_equal_one_device(results, run):
    got = results[run]
    assert got["logits"] <= 1e-5
    assert got["loss"] <= 1e-5
    assert got["grads"] <= 1e-5
    # The batch stays over "data" and the vocabulary over "model" at the output.
    assert got["logits_spec"][0] == "data"


def test_column_sharded_sparse_kernels_split_over_model(results):
    got = results["sparse columns"]
    assert got["max_diff"] <= 1e-5
    # gate/up [64, 128] in 16 x 16 blocks: 8 block columns, split 8 ways; down [128, 64]
    # has 4 block columns and stays whole.
    assert (
        sorted(p.split(".")[-1] for p in got["column_sharded"])
        == ["gate_proj"] * 2 + ["up_proj"] * 2
    )
    assert got["gate_spec"] == "P('model',)"
    assert got["gate_blocks"][1] * 8 == got["gate_blocks"][0]


def test_parameters_take_a_fraction_of_the_memory_per_device(results):
    for run in ("interpret (2, 4)", "xla (4, 8)"):
        got = results[run]
        assert got["param_bytes_device0"] < got["param_bytes"] / 2, got
