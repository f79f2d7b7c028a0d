"""Expert parallelism on 8 simulated CPU devices (a script; ``test_expert_parallel.py``).

Prints one ``RESULT{json}`` line: case name -> max error relative to the largest
reference value (floats), or a string / bool for the non-numeric checks. The
references are single-device: ``run_experts`` without a mesh (permute, grouped matmul,
unpermute) and, for the model's block, ``MoEBlock.reference`` (every expert on every
token, masked; no kernels).
"""

from __future__ import annotations

import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from capibara.core.moe import MoEBlock, MoEBlockConfig
from capibara.core.token_routers import ExpertChoiceRouterConfig, TokenRouterConfig
from capibara.kernels import grouped_matmul, moe
from capibara.kernels._mesh import MeshLayoutWarning

RESULTS: dict[str, object] = {}
E, T, K, D, F = 8, 32, 2, 16, 24


def mesh_of(shape, axes):
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(shape))


def err(got, want):
    worst = 0.0
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        worst = max(worst, float(np.max(np.abs(x - y)) / max(1.0, float(np.max(np.abs(y))))))
    return worst


def ffn(params, x_sorted, group_sizes, **kw):
    w_up, w_down = params
    hidden = jnp.tanh(grouped_matmul(x_sorted, w_up, group_sizes, **kw))
    return grouped_matmul(hidden, w_down, group_sizes, split_k=True, **kw)


def inputs():
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (T, D))
    ids = jax.random.randint(keys[1], (T, K), 0, E)
    ids = ids.at[3, 1].set(E).at[5, 0].set(-1)  # two dropped choices
    ids = ids.at[:8].set(jnp.asarray([0, 1]))  # skewed: one shard gets many rows
    weights = jax.nn.softmax(jax.random.normal(keys[2], (T, K)))
    params = (
        jax.random.normal(keys[3], (E, D, F)) * 0.3,
        jax.random.normal(keys[4], (E, F, D)) * 0.3,
    )
    return x, ids, weights, params


def loss_of(fn):
    return lambda x, w, p: jnp.sum(jnp.sin(fn(x, w, p)))


def run_experts_cases():
    x, ids, weights, params = inputs()

    def single(x, w, p):
        return moe.run_experts(x, ids, w, ffn, p, num_experts=E)

    want = single(x, weights, params)
    want_grads = jax.grad(loss_of(single), argnums=(0, 1, 2))(x, weights, params)
    layouts = (
        ((2, 4), ("data", "expert")),
        ((4, 2), ("expert", "model")),
        ((2, 2, 2), ("data", "expert", "model")),
    )
    for shape, axes in layouts:
        mesh = mesh_of(shape, axes)
        tp = "model" if "model" in axes else None
        placed = (
            jax.device_put(params[0], NamedSharding(mesh, P("expert", None, tp))),
            jax.device_put(params[1], NamedSharding(mesh, P("expert", tp))),
        )
        for exchange, collective in (
            ("all_gather", None),
            ("ragged_all_to_all", moe.emulated_ragged_all_to_all),
        ):
            kernels = [("xla", {"implementation": "xla"})]
            if shape == (2, 2, 2):
                kernels.append(("interpret", {"interpret": True}))
            for name, kw in kernels:
                fn = functools.partial(
                    moe.run_experts,
                    expert_ids=ids,
                    expert_fn=functools.partial(ffn, **kw),
                    num_experts=E,
                    exchange=exchange,
                    ragged_all_to_all=collective,
                )

                def op(x, w, p, fn=fn):
                    return fn(x, weights=w, params=p)

                case = f"{shape} {exchange} {name}"
                out = jax.jit(op)(x, weights, placed)
                RESULTS[f"{case} fwd"] = err(out, want)
                RESULTS[f"{case} out spec"] = str(out.sharding.spec)
                grads = jax.jit(jax.grad(loss_of(op), argnums=(0, 1, 2)))(x, weights, placed)
                RESULTS[f"{case} grads"] = err(grads, want_grads)
                RESULTS[f"{case} weight grad spec"] = str(grads[2][0].sharding.spec)


def default_exchange_cases():
    """``exchange=None`` on CPU is the all-gather form; an explicit ragged one fails at
    lowering with a message; experts that do not split warn and stay correct."""
    x, ids, weights, params = inputs()
    want = moe.run_experts(x, ids, weights, ffn, params, num_experts=E)
    mesh = mesh_of((2, 4), ("data", "expert"))
    placed = jax.device_put(params, NamedSharding(mesh, P("expert")))
    out = jax.jit(lambda p: moe.run_experts(x, ids, weights, ffn, p, num_experts=E))(placed)
    RESULTS["default exchange fwd"] = err(out, want)
    try:
        jax.jit(
            lambda p: moe.run_experts(
                x, ids, weights, ffn, p, num_experts=E, exchange="ragged_all_to_all"
            )
        )(placed)
        RESULTS["explicit ragged on cpu"] = "no error"
    except ValueError as e:
        RESULTS["explicit ragged on cpu"] = str(e)
    # 6 experts on 4 expert shards: the all-tokens path, with a warning.
    six = jax.tree.map(lambda w: w[:6], params)
    ids6 = jnp.where(ids < 6, ids, 6)
    want6 = moe.run_experts(x, ids6, weights, ffn, six, num_experts=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mesh6 = mesh_of((4, 2), ("expert", "model"))
        placed6 = jax.device_put(six, NamedSharding(mesh6, P(None, None, "model")))
        out6 = jax.jit(lambda p: moe.run_experts(x, ids6, weights, ffn, p, num_experts=6))(placed6)
    RESULTS["6 experts on 4 shards fwd"] = err(out6, want6)
    RESULTS["6 experts on 4 shards warned"] = any(
        issubclass(w.category, MeshLayoutWarning) and "6 experts" in str(w.message) for w in caught
    )


def moe_block_cases():
    """The model's block (token choice with a shared expert; expert choice) on a data x
    expert x model mesh, Pallas in interpret mode, against its dense reference."""
    routers = {
        "token choice": TokenRouterConfig(num_experts=E, top_k=2),
        "expert choice": ExpertChoiceRouterConfig(num_experts=E, capacity_factor=2.0),
    }
    x = jax.random.normal(jax.random.key(7), (4, 8, D))
    mesh = mesh_of((2, 2, 2), ("data", "expert", "model"))
    for name, router in routers.items():
        config = MoEBlockConfig(
            d_model=D, ffn_dim=F, router=router, num_shared_experts=1, interpret=True
        )
        block = MoEBlock(config, rngs=nnx.Rngs(0))
        want, _ = block.reference(x)

        def loss(block, x):
            y, _ = block(x)
            return jnp.sum(jnp.sin(y))

        want_grads = nnx.grad(lambda b, x: jnp.sum(jnp.sin(b.reference(x)[0])))(block, x)
        sharded = MoEBlock(config, rngs=nnx.Rngs(0))
        state = nnx.state(sharded, nnx.Param)
        specs = {
            "w_gate_up": P("expert", None, "model"),
            "w_down": P("expert", "model"),
        }
        for path, var in nnx.to_flat_state(state):
            spec = specs.get(str(path[-1]), P())
            var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))
        nnx.update(sharded, state)
        x_placed = jax.device_put(x, NamedSharding(mesh, P("data")))
        got, _ = nnx.jit(lambda b, x: b(x))(sharded, x_placed)
        RESULTS[f"block {name} fwd"] = err(got, want)
        grads = nnx.jit(nnx.grad(loss))(sharded, x_placed)
        RESULTS[f"block {name} grads"] = err(
            jax.tree.leaves(nnx.state(grads, nnx.Param)),
            jax.tree.leaves(nnx.state(want_grads, nnx.Param)),
        )


def emulation_cases():
    """``emulated_ragged_all_to_all`` reproduces the example in the docstring of
    ``jax.lax.ragged_all_to_all`` (axis of size 2)."""
    mesh = mesh_of((2,), ("x",))
    per_shard = {
        "operand": [[1, 2, 2], [3, 4, 0]],
        "output": [[0, 0, 0, 0], [0, 0, 0, 0]],
        "input_offsets": [[0, 1], [0, 1]],
        "send_sizes": [[1, 2], [1, 1]],
        "output_offsets": [[0, 0], [1, 2]],
        "recv_sizes": [[1, 1], [2, 1]],
    }
    args = [jnp.asarray(np.concatenate(v), jnp.int32) for v in per_shard.values()]
    fn = jax.shard_map(
        functools.partial(moe.emulated_ragged_all_to_all, axis_name="x"),
        mesh=mesh,
        in_specs=(P("x"),) * 6,
        out_specs=P("x"),
    )
    RESULTS["emulation matches the docstring"] = np.asarray(jax.jit(fn)(*args)).tolist() == [
        1,
        3,
        0,
        0,
        2,
        2,
        4,
        0,
    ]


def tpu_export_cases():
    """The default exchange exported for TPU: ragged all-to-alls around Mosaic calls,
    forward and gradients (``ragged_all_to_all`` needs its safety check disabled)."""
    mesh = mesh_of((2, 4), ("data", "expert"))
    tokens = NamedSharding(mesh, P(("data", "expert")))
    experts = NamedSharding(mesh, P("expert"))
    x = jax.ShapeDtypeStruct((64, 128), jnp.bfloat16, sharding=tokens)
    ids = jax.ShapeDtypeStruct((64, 2), jnp.int32, sharding=tokens)
    weights = jax.ShapeDtypeStruct((64, 2), jnp.float32, sharding=tokens)
    params = (
        jax.ShapeDtypeStruct((E, 128, 256), jnp.bfloat16, sharding=experts),
        jax.ShapeDtypeStruct((E, 256, 128), jnp.bfloat16, sharding=experts),
    )

    def forward(x, ids, weights, params):
        return moe.run_experts(x, ids, weights, ffn, params, num_experts=E)

    def gradients(x, ids, weights, params):
        def loss(x, params):
            return jnp.sum(forward(x, ids, weights, params).astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1))(x, params)

    checks = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
    for name, fn in (("forward", forward), ("gradients", gradients)):
        exported = jax.export.export(jax.jit(fn), platforms=["tpu"], disabled_checks=checks)(
            x, ids, weights, params
        )
        text = exported.mlir_module()
        RESULTS[f"tpu export {name}"] = (
            f"{text.count('custom_call @ragged_all_to_all')} ragged_all_to_all, "
            f"{text.count('custom_call @tpu_custom_call')} mosaic, {exported.nr_devices} devices"
        )


if __name__ == "__main__":
    run_experts_cases()
    default_exchange_cases()
    moe_block_cases()
    emulation_cases()
    tpu_export_cases()
    print("RESULT" + json.dumps(RESULTS))
