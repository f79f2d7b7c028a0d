"""``shard``: place a model's parameters on a device mesh by logical axis.

Each parameter dimension has a logical name (``vocab``, ``embed``, ``heads``, ``mlp``,
``experts``); ``LOGICAL_RULES`` maps names to mesh axes: batch -> ``data``; heads, MLP
and vocabulary -> ``model``; experts -> ``expert``. A dimension stays replicated when
its mesh axis is absent from the mesh or does not divide it. Activations follow by
GSPMD propagation under ``jax.jit`` (the batch is sharded with ``batch_sharding``).

Kernels: every op finds the mesh on its inputs and runs per shard through
``shard_map`` (``capibara.kernels._mesh``), so the Pallas kernels (which XLA cannot
partition) and the native CPU kernels work under a sharded ``jit`` with any
implementation; the rest of the model is partitioned by GSPMD.

Multi-host: call ``jax.distributed.initialize()`` on every host before building the
mesh from ``jax.devices()`` (all hosts' devices); nothing else changes.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical axis -> mesh axis
LOGICAL_RULES: dict[str, str] = {
    "batch": "data",
    "vocab": "model",
    "heads": "model",
    "mlp": "model",
    "experts": "expert",
}

# parameter path pattern -> logical names of its dimensions (None: replicated)
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed\.embedding", ("vocab", "embed")),
    (r"head\.lm_head", ("embed", "vocab")),
    (r".*self_attn\.[qkv]_proj\.kernel", ("embed", "heads")),
    (r".*self_attn\.[qkv]_proj\.bias", ("heads",)),
    (r".*self_attn\.o_proj\.kernel", ("heads", "embed")),
    (r".*mlp\.(gate|up)_proj\.kernel", ("embed", "mlp")),
    (r".*mlp\.down_proj\.kernel", ("mlp", "embed")),
    (r".*mlp\.w_gate_up", ("experts", "embed", "mlp")),
    (r".*mlp\.w_down", ("experts", "mlp", "embed")),
    (r".*mlp\.shared_gate_up", ("embed", "mlp")),
    (r".*mlp\.shared_down", ("mlp", "embed")),
)


def make_mesh(shape: tuple[int, ...], axes: tuple[str, ...] = ("data", "model")) -> Mesh:
    """A mesh of the first ``prod(shape)`` devices, e.g. ``(4, 8)`` for a v4-32 layout."""
    count = int(np.prod(shape))
    devices = jax.devices()
    if count > len(devices):
        raise ValueError(f"mesh shape {shape} needs {count} devices, {len(devices)} available")
    return Mesh(np.asarray(devices[:count]).reshape(shape), axes)


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The ``PartitionSpec`` of parameter ``path`` with ``shape`` on ``mesh``."""
    for pattern, logical in PARAM_AXES:
        if re.fullmatch(pattern, path) and len(logical) == len(shape):
            axes = []
            for name, size in zip(logical, shape, strict=True):
                mesh_axis = LOGICAL_RULES.get(name)
                fits = mesh_axis in mesh.shape and size % mesh.shape[mesh_axis] == 0
                axes.append(mesh_axis if fits and mesh_axis not in axes else None)
            return PartitionSpec(*axes)
    return PartitionSpec()  # norms, routers, block-sparse kernels: replicated


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` input: batch over ``data`` (if the mesh has it)."""
    return NamedSharding(mesh, PartitionSpec("data" if "data" in mesh.shape else None))


def shard(model, mesh: Mesh) -> dict[str, PartitionSpec]:
    """Moves ``model``'s parameters onto ``mesh`` in place, by logical axis.

    Returns:
      parameter path -> the ``PartitionSpec`` it was placed with.
    """
    specs: dict[str, PartitionSpec] = {}
    state = nnx.state(model, nnx.Variable)
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        if not isinstance(value, jax.Array):
            continue
        dotted = ".".join(map(str, path))
        spec = partition_spec(dotted, value.shape, mesh)
        var.set_value(jax.device_put(value, NamedSharding(mesh, spec)))
        specs[dotted] = spec
    nnx.update(model, state)
    return specs
