"""The one rule that runs an op per shard when a device mesh is in play.

XLA cannot partition a Mosaic (Pallas TPU) custom call: inside a sharded ``jit`` it
raises "Mosaic kernels cannot be automatically partitioned. Please wrap the call in a
shard_map", and an interpret-mode kernel is silently gathered onto one device. So every
public op hands its implementation to ``run_per_shard``, which wraps it in
``jax.shard_map`` whenever a mesh is in play, and users never call ``shard_map``.

Where the mesh comes from, first match wins:

1. the context mesh (``jax.set_mesh(mesh)`` / ``jax.sharding.use_mesh``);
2. the mesh of an input's ``NamedSharding`` (a ``jax.Array`` placed on a mesh, or a
   tracer of one under ``jit``: parameters placed by ``capibara.shard`` carry it into
   every activation computed from them).

Only mesh axes of size > 1 that are not already manual count: inside a user's own
``shard_map`` (or inside another op's) an op runs as it is, on its shard.

Each op declares its layout as logical names per input dimension (``None``: never
split). ``LOGICAL_TO_MESH`` maps a name to a mesh axis; a name is split over its axis
when that axis is in the mesh and divides every dimension carrying the name, and is
otherwise computed replicated over it with a ``MeshLayoutWarning`` (correct, slower:
never a wrong result). The per-op layouts:

==========================  ==================================================
op                          split
==========================  ==================================================
flash_attention             batch -> ``data``; q heads and kv heads -> ``model``
paged (prefill) attention   batch -> ``data``; q heads and kv heads -> ``model``
rope_kv_write               q heads and kv heads -> ``model``
grouped_matmul              experts -> ``expert`` (+ ``psum``); n -> ``model``,
                            or k -> ``model`` (+ ``psum``) with ``split_k=True``
transposed_grouped_matmul   experts -> ``expert``; n -> ``model``
block_sparse_matmul         rows of ``x`` -> ``data``
decode_matmul               rows -> ``data``; n -> ``model``
==========================  ==================================================

Grouped query attention with fewer kv heads than the ``model`` axis (``Hkv < m``,
``m % Hkv == 0``): every shard needs exactly one kv head, so the kv arrays are
repeated to ``m`` heads before the split (``repeat_kv_heads``), and each device stores
the one head its query heads read, not all of them (``jnp.repeat`` to ``Hq`` heads, the
common workaround, stores ``Hq / m`` copies per device).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
    "LOGICAL_TO_MESH",
    "MeshLayoutWarning",
    "active_mesh",
    "run_per_shard",
]

# logical dimension name -> the mesh axis it is split over (the model's convention,
# see ``capibara.sharding.LOGICAL_RULES``).
LOGICAL_TO_MESH: dict[str, str] = {
    "batch": "data",
    "rows": "data",
    "heads": "model",
    "kv_heads": "model",
    "cols": "model",
    "contract": "model",
    "experts": "expert",
}

Axes = tuple[str | None, ...] | None  # logical name per dimension; None: an absent input


class MeshLayoutWarning(UserWarning):
    """An op's input could not be split over a mesh axis and runs replicated over it."""


def active_mesh(args: Sequence[object]) -> Mesh | AbstractMesh | None:
    """The mesh the op's inputs live on (see the module docstring), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh
    for arg in jax.tree.leaves(args):
        if isinstance(arg, jax.Array) and not isinstance(arg, jax.core.Tracer):
            sharding = arg.sharding
            if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
                return sharding.mesh
        elif isinstance(arg, jax.core.Tracer):
            sharding = getattr(jax.typeof(arg), "sharding", None)
            mesh = getattr(sharding, "mesh", None)
            if mesh is not None and not mesh.empty and mesh.size > 1:
                return mesh
    return None


def free_axes(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    """Mesh axes an op may still split over: size > 1 and not already manual."""
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    return {
        name: size
        for name, size in mesh.shape.items()
        if size > 1 and types[name] != AxisType.Manual
    }


def resolve(
    op_name: str,
    args: Sequence[object],
    in_axes: Sequence[Axes],
    axes: dict[str, int],
    *,
    tie_heads: bool = True,
) -> dict[str, str | None]:
    """Logical name -> the mesh axis it is split over (None: replicated), warning
    for every name whose axis is present but does not divide its dimensions.

    With ``tie_heads`` (attention), query heads split only where their kv heads split
    too (or there is one kv head): shard ``j`` then holds query heads
    ``[j·Hq/m, (j+1)·Hq/m)`` and exactly the kv heads they read."""
    sizes: dict[str, set[int]] = {}
    for arg, names in zip(args, in_axes, strict=True):
        if names is None or arg is None:
            continue
        if len(names) != jnp.ndim(arg):
            raise ValueError(f"{op_name}: layout {names} does not match shape {jnp.shape(arg)}")
        for name, size in zip(names, jnp.shape(arg), strict=True):
            if name is not None:
                sizes.setdefault(name, set()).add(size)
    resolved: dict[str, str | None] = {}
    for name, dims in sizes.items():
        axis = LOGICAL_TO_MESH[name]
        if axis not in axes:
            resolved[name] = None
        elif all(d % axes[axis] == 0 for d in dims):
            resolved[name] = axis
        else:
            resolved[name] = None
            warnings.warn(
                f"{op_name}: {name} of size {sorted(dims)} is not divisible by mesh axis "
                f"{axis!r} of size {axes[axis]}; computing it replicated over {axis!r}",
                MeshLayoutWarning,
                stacklevel=4,
            )
    tied = tie_heads and resolved.get("heads") and "kv_heads" in sizes
    if tied and not resolved.get("kv_heads") and sizes["kv_heads"] != {1}:
        # Split query heads would meet the wrong kv heads: keep them whole too.
        resolved["heads"] = None
        warnings.warn(
            f"{op_name}: {sorted(sizes['kv_heads'])} kv heads cannot be split over "
            f"{axes[LOGICAL_TO_MESH['kv_heads']]} shards (nor repeated to them); "
            f"computing attention replicated over {LOGICAL_TO_MESH['heads']!r}",
            MeshLayoutWarning,
            stacklevel=4,
        )
    return resolved


def repeat_kv_heads(
    args: list[object], in_axes: Sequence[Axes], axes: dict[str, int]
) -> list[object]:
    """Repeats the ``kv_heads`` dimension up to the ``model`` axis size where there are
    fewer kv heads than shards (``m % Hkv == 0``) and the query heads split evenly."""
    m = axes.get(LOGICAL_TO_MESH["kv_heads"], 1)
    q_heads = [
        jnp.shape(a)[names.index("heads")]
        for a, names in zip(args, in_axes, strict=True)
        if names is not None and a is not None and "heads" in names
    ]
    if m == 1 or not q_heads or any(h % m for h in q_heads):
        return args
    out = list(args)
    for i, (arg, names) in enumerate(zip(args, in_axes, strict=True)):
        if names is None or arg is None or "kv_heads" not in names:
            continue
        dim = names.index("kv_heads")
        hkv = jnp.shape(arg)[dim]
        if hkv < m and m % hkv == 0:
            out[i] = jnp.repeat(arg, m // hkv, axis=dim)
    return out


def _is_names(x) -> bool:
    """A leaf of ``out_axes``: one output's tuple of logical names."""
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def spec(names: Axes, resolved: dict[str, str | None]) -> PartitionSpec | None:
    if names is None:
        return None
    return PartitionSpec(*(None if n is None else resolved.get(n) for n in names))


def run_per_shard(
    op_name: str,
    run: Callable[..., object],
    args: Sequence[object],
    in_axes: Sequence[Axes],
    out_axes: object,
    *,
    body: Callable[..., object] | None = None,
    attention: bool = True,
) -> object:
    """``run(*args)``, per shard of the mesh the inputs live on (if any).

    Args:
      op_name: the public op, for messages.
      run: the implementation, ``run(*args) -> outputs``; called on the whole arrays
        when no mesh is in play, and on every shard's blocks otherwise.
      args: positional inputs (``None`` for an absent optional one).
      in_axes: per input, its logical dimension names (see ``LOGICAL_TO_MESH``).
      out_axes: the outputs' logical names, a pytree of tuples like ``run``'s outputs.
      body: ``body(resolved, *local_args)`` run per shard instead of ``run`` when a
        mesh is in play, for ops that need the split (``resolved``: logical name ->
        mesh axis or None) to add a collective, e.g. a ``psum`` over experts.
      attention: ``heads`` read ``kv_heads`` (grouped query attention): kv heads are
        repeated up to the ``model`` axis where there are fewer, and query heads split
        only with them. False for ops whose outputs carry the kv heads (the pools
        ``rope_kv_write`` returns), where the two are independent.

    Returns:
      ``run``'s outputs, laid out by ``out_axes`` on the mesh.
    """
    mesh = active_mesh(args)
    axes = free_axes(mesh) if mesh is not None else {}
    if not axes:
        return run(*args)
    if attention:
        args = repeat_kv_heads(list(args), in_axes, axes)
    resolved = resolve(op_name, args, in_axes, axes, tie_heads=attention)
    present = [i for i, a in enumerate(args) if a is not None]
    in_specs = tuple(spec(in_axes[i], resolved) for i in present)
    out_specs = jax.tree.map(
        lambda names: spec(names, resolved),
        out_axes,
        is_leaf=_is_names,
    )
    local = functools.partial(body, resolved) if body is not None else run

    def per_shard(*present_args):
        full = [None] * len(args)
        for i, a in zip(present, present_args, strict=True):
            full[i] = a
        return local(*full)

    mapped = jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=out_specs,
        # Every axis not yet manual goes manual, size-1 ones too: even when nothing
        # splits, XLA must never be left to partition a Pallas call.
        axis_names=frozenset(
            n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t != AxisType.Manual
        ),
        check_vma=False,
    )
    return mapped(*(args[i] for i in present))


def shard_offset(resolved: dict[str, str | None], name: str, local_size: int) -> jax.Array:
    """This shard's first index along logical dimension ``name`` (0 when not split)."""
    axis = resolved.get(name)
    if axis is None:
        return jnp.int32(0)
    return jax.lax.axis_index(axis).astype(jnp.int32) * local_size
