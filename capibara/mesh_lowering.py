"""The model exported for TPU on 32-device meshes: per-shard Mosaic calls, no partitioner error.

``make lower`` runs this after the per-kernel table, in a process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=32`` (32 CPU devices stand in for a
v4-32 slice; ``jax.export`` lowers for TPU without one). Each row exports the
``tiny-moe`` forward or the gradient of its training loss with the parameters placed
by ``capibara.shard``, then the ``llama-3-8b`` and ``mixtral-8x7b`` forwards from
abstract inputs, and prints the Mosaic and ``ragged_all_to_all`` calls in the exported
module and the parameter bytes one device holds. Two meshes: ``(4, 8)`` data x model
(tensor parallel), and ``(2, 4, 4)`` data x expert x model, where the MoE layers
exchange tokens between expert shards (``capibara.kernels.moe.run_experts``).

``ragged_all_to_all`` is a custom call JAX gives no serialization-compatibility
guarantee for, so these exports pass
``DisabledSafetyCheck.custom_call("ragged_all_to_all")`` (as must users who export an
expert-parallel model).
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

TENSOR_PARALLEL = ((4, 8), ("data", "model"))
EXPERT_PARALLEL = ((2, 4, 4), ("data", "expert", "model"))
EXPORT_CHECKS = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
V4_HBM_BYTES = 32 * 2**30  # one TPU v4 chip
ABSTRACT_MODELS = ("llama-3-8b", "mixtral-8x7b")
ABSTRACT_TOKENS = (8, 2048)  # batch 8 over "data", 2048 positions


def export_for_tpu(fn, *args) -> tuple[jax.export.Exported, str]:
    """``fn`` exported for TPU, and a count of its Mosaic and ragged all-to-all calls."""
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"], disabled_checks=EXPORT_CHECKS)(
        *args
    )
    text = exported.mlir_module()
    calls = f"{text.count('tpu_custom_call')} tpu_custom_call"
    ragged = text.count("custom_call @ragged_all_to_all")
    return exported, calls + (f", {ragged} ragged_all_to_all" if ragged else "")


def exported_rows(
    config_name: str = "tiny-moe", layout=TENSOR_PARALLEL
) -> list[tuple[str, str, str, str]]:
    """``(program, devices, time, status)`` per exported program."""
    shape, axes = layout
    mesh = make_mesh(shape, axes)
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
            exported, calls = export_for_tpu(fn, state, tokens)
            devices = str(exported.nr_devices)
            status = f"ok ({calls}; params {local:,} of {total:,} B on device 0)"
            if calls.startswith("0 "):
                status = "FAILED: no Mosaic call in the exported module"
        except Exception as e:  # report both programs, then fail
            status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        elapsed = f"{time.perf_counter() - start:.1f}s"
        rows.append((f"{config_name} {name} on {_named(layout)}", devices, elapsed, status))
    return rows


def abstract_rows(names=ABSTRACT_MODELS, layout=TENSOR_PARALLEL) -> list[tuple[str, str, str, str]]:
    """The full-size forwards exported for TPU from ``jax.ShapeDtypeStruct`` inputs
    carrying ``capibara.shard``'s placements: no weight is ever materialized."""
    shape, axes = layout
    mesh = make_mesh(shape, axes)
    rows = []
    for name in names:
        start, devices = time.perf_counter(), "-"
        graphdef, state = abstract_model(preset(name), mesh)
        local, total = bytes_per_device(state)
        tokens = jax.ShapeDtypeStruct(ABSTRACT_TOKENS, jnp.int32, sharding=batch_sharding(mesh))

        def forward(state, tokens, graphdef=graphdef):
            return nnx.merge(graphdef, state)(tokens)[0]

        try:
            exported, calls = export_for_tpu(forward, state, tokens)
            devices = str(exported.nr_devices)
            fits = "fits" if local < V4_HBM_BYTES else "does NOT fit"
            status = (
                f"ok ({calls}; params {local / 2**30:.2f} of "
                f"{total / 2**30:.1f} GiB per device, {fits} a v4 chip's 32 GiB before activations)"
            )
        except Exception as e:  # report every program, then fail
            status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        elapsed = f"{time.perf_counter() - start:.1f}s"
        batch, length = ABSTRACT_TOKENS
        rows.append(
            (f"{name} forward {batch}x{length} on {_named(layout)}", devices, elapsed, status)
        )
    return rows


def _named(layout) -> str:
    """``(2, 4, 4) data x expert x model``."""
    shape, axes = layout
    return f"{shape} {' x '.join(axes)}"


def main() -> int:
    needed = 32  # both layouts
    if jax.device_count() < needed:
        print(
            f"needs {needed} devices, found {jax.device_count()}: run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed}"
        )
        return 1
    with warnings.catch_warnings():
        # tiny's 4 query heads do not split over 8 model shards: replicated, as warned.
        warnings.simplefilter("ignore", MeshLayoutWarning)
        rows = (
            exported_rows()
            + exported_rows(layout=EXPERT_PARALLEL)
            + abstract_rows()
            + abstract_rows(["mixtral-8x7b"], layout=EXPERT_PARALLEL)
        )
    header = ("sharded program", "devices", "time", "status")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return 1 if any(r[3].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
