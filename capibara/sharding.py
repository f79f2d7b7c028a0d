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

import math
import re

import jax
import jax.numpy as jnp
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
    return PartitionSpec()  # norms, routers, block-sparse kernels (unless column-sharded)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` input: batch over ``data`` (if the mesh has it)."""
    return NamedSharding(mesh, PartitionSpec("data" if "data" in mesh.shape else None))


def shard(model, mesh: Mesh) -> dict[str, PartitionSpec]:
    """Moves ``model``'s parameters onto ``mesh`` in place, by logical axis.

    Returns:
      parameter path -> the ``PartitionSpec`` it was placed with.
    """
    specs: dict[str, PartitionSpec] = {}
    column_sharded = _column_sharded_kernels(model, mesh)
    state = nnx.state(model, nnx.Variable)
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        if not isinstance(value, jax.Array):
            continue
        dotted = _dotted(path)
        spec = column_sharded.get(dotted) or partition_spec(dotted, value.shape, mesh)
        var.set_value(jax.device_put(value, NamedSharding(mesh, spec)))
        specs[dotted] = spec
    nnx.update(model, state)
    return specs


def _column_sharded_kernels(model, mesh: Mesh) -> dict[str, PartitionSpec]:
    """Block-sparse kernels stored in column shards (``sparsify(column_shards=S)``):
    their blocks split over ``model`` where that axis divides ``S``."""
    from capibara.core.layers import Linear
    from capibara.kernels.block_sparse import ColumnShardedLayout

    model_axis = LOGICAL_RULES["mlp"]
    if model_axis not in mesh.shape:
        return {}
    size = mesh.shape[model_axis]
    specs = {}
    for path, module in nnx.iter_graph(model):
        layout = getattr(module, "sparse_layout", None) if isinstance(module, Linear) else None
        if isinstance(layout, ColumnShardedLayout) and layout.num_shards % size == 0:
            specs[_dotted((*path, "kernel"))] = PartitionSpec(model_axis)
    return specs


def abstract_model(config, mesh: Mesh):
    """``(graphdef, state)`` of a ``CapibaraModel`` of ``config`` whose arrays are
    ``jax.ShapeDtypeStruct`` s placed on ``mesh`` as ``shard`` places them: lower or
    compile a full-size model for a mesh without materializing a weight."""
    from capibara.core.model import CapibaraModel  # the model imports flax layers

    abstract = nnx.eval_shape(lambda: CapibaraModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    placed = []
    for path, value in nnx.to_flat_state(state):
        sharding = NamedSharding(mesh, partition_spec(_dotted(path), value.shape, mesh))
        placed.append((path, jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)))
    return graphdef, nnx.from_flat_state(placed)


def bytes_per_device(tree) -> tuple[int, int]:
    """``(bytes of one device's shard, total bytes)`` summed over the placed arrays (or
    ``jax.ShapeDtypeStruct`` s) of ``tree``."""
    local = total = 0
    for leaf in jax.tree.leaves(tree):
        itemsize = jnp.dtype(leaf.dtype).itemsize
        total += math.prod(leaf.shape) * itemsize
        local += math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize
    return local, total


def _dotted(path) -> str:
    """A flat-state path as the dotted name ``PARAM_AXES`` matches."""
    return ".".join(map(str, path))
