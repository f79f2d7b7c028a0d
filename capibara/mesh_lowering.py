"""The model exported for TPU on a (4, 8) mesh: per-shard Mosaic calls, no partitioner error.

``make lower`` runs this after the per-kernel table, in a process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=32`` (32 CPU devices stand in for a
v4-32 slice; ``jax.export`` lowers for TPU without one). Each row exports the
``tiny-moe`` forward or the gradient of its training loss with the parameters placed
by ``capibara.shard``, then the ``llama-3-8b`` and ``mixtral-8x7b`` forwards from
abstract inputs, and prints the Mosaic calls in the exported module and the parameter
bytes one device holds.
"""

from __future__ import annotations

import sys
import time
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from capibara.core.config import preset
from capibara.core.model import CapibaraModel
from capibara.kernels._mesh import MeshLayoutWarning
from capibara.sharding import (
    abstract_model,
    batch_sharding,
    bytes_per_device,
    make_mesh,
    shard,
)
from capibara.training import next_token_loss

MESH_SHAPE = (4, 8)
V4_HBM_BYTES = 32 * 2**30  # one TPU v4 chip
ABSTRACT_MODELS = ("llama-3-8b", "mixtral-8x7b")
ABSTRACT_TOKENS = (8, 2048)  # batch 8 over "data", 2048 positions


def exported_rows(config_name: str = "tiny-moe") -> list[tuple[str, str, str, str]]:
    """``(program, devices, time, status)`` per exported program."""
    mesh = make_mesh(MESH_SHAPE)
    model = CapibaraModel(preset(config_name), rngs=nnx.Rngs(0))
    shard(model, mesh)
    graphdef, state = nnx.split(model)
    tokens = jax.device_put(jnp.zeros((8, 32), jnp.int32), batch_sharding(mesh))
    local, total = bytes_per_device(nnx.state(model, nnx.Param))

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)[0]

    def gradients(state, tokens):
        return jax.grad(lambda s: next_token_loss(nnx.merge(graphdef, s), tokens)[0])(state)

    rows = []
    for name, fn in (("forward", forward), ("training gradients", gradients)):
        start, devices = time.perf_counter(), "-"
        try:
            exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(state, tokens)
            calls = exported.mlir_module().count("tpu_custom_call")
            devices = str(exported.nr_devices)
            status = f"ok ({calls} tpu_custom_call; params {local:,} of {total:,} B on device 0)"
            if calls == 0:
                status = "FAILED: no Mosaic call in the exported module"
        except Exception as e:  # report both programs, then fail
            status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        elapsed = f"{time.perf_counter() - start:.1f}s"
        rows.append((f"{config_name} {name} on {MESH_SHAPE}", devices, elapsed, status))
    return rows


def abstract_rows(names=ABSTRACT_MODELS) -> list[tuple[str, str, str, str]]:
    """The full-size forwards exported for TPU from ``jax.ShapeDtypeStruct`` inputs
    carrying ``capibara.shard``'s placements: no weight is ever materialized."""
    mesh = make_mesh(MESH_SHAPE)
    rows = []
    for name in names:
        start, devices = time.perf_counter(), "-"
        graphdef, state = abstract_model(preset(name), mesh)
        local, total = bytes_per_device(state)
        tokens = jax.ShapeDtypeStruct(ABSTRACT_TOKENS, jnp.int32, sharding=batch_sharding(mesh))

        def forward(state, tokens, graphdef=graphdef):
            return nnx.merge(graphdef, state)(tokens)[0]

        try:
            exported = jax.export.export(jax.jit(forward), platforms=["tpu"])(state, tokens)
            calls = exported.mlir_module().count("tpu_custom_call")
            devices = str(exported.nr_devices)
            fits = "fits" if local < V4_HBM_BYTES else "does NOT fit"
            status = (
                f"ok ({calls} tpu_custom_call; params {local / 2**30:.2f} of "
                f"{total / 2**30:.1f} GiB per device, {fits} a v4 chip's 32 GiB before activations)"
            )
        except Exception as e:  # report every program, then fail
            status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        elapsed = f"{time.perf_counter() - start:.1f}s"
        batch, length = ABSTRACT_TOKENS
        rows.append((f"{name} forward {batch}x{length} on {MESH_SHAPE}", devices, elapsed, status))
    return rows


def main() -> int:
    needed = MESH_SHAPE[0] * MESH_SHAPE[1]
    if jax.device_count() < needed:
        print(
            f"needs {needed} devices, found {jax.device_count()}: run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed}"
        )
        return 1
    with warnings.catch_warnings():
        # tiny's 4 query heads do not split over 8 model shards: replicated, as warned.
        warnings.simplefilter("ignore", MeshLayoutWarning)
        rows = exported_rows() + abstract_rows()
    header = ("sharded program", "devices", "time", "status")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return 1 if any(r[3].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
