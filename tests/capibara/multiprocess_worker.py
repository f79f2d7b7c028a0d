"""One of the processes of ``test_multiprocess.py`` (a script, run as ``python FILE ID PORT OUT``).

Joins a 2-process ``jax.distributed`` job on 127.0.0.1 (gloo collectives on CPU, 4
devices per process), builds a (2, 4) ``("data", "model")`` mesh over the 8 global
devices and runs the ``tiny-moe`` forward and one training step on it; then the same on
process 0's first device alone. Prints ``RESULT{json}`` (devices and losses) and saves
the logits before and after the step to ``OUT/mesh{ID}.npz`` (and ``OUT/single.npz``).
"""

from __future__ import annotations

import json
import pathlib
import sys
import warnings

import jax

process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from capibara.core.config import preset  # noqa: E402
from capibara.core.model import CapibaraModel  # noqa: E402
from capibara.sharding import batch_sharding, make_mesh, shard  # noqa: E402
from capibara.training import make_optimizer, train_step  # noqa: E402

warnings.simplefilter("ignore")  # tiny's heads on 4 model shards repeat kv heads, quietly
config = preset("tiny-moe")  # the default implementation: what a user runs
tokens = np.random.default_rng(0).integers(0, 256, (4, 17)).astype(np.int32)


def run(mesh):
    model = CapibaraModel(config, rngs=nnx.Rngs(0))
    if mesh is None:
        toks = jnp.asarray(tokens)
    else:
        shard(model, mesh)
        toks = jax.make_array_from_callback(
            tokens.shape, batch_sharding(mesh), lambda index: tokens[index]
        )
    logits = nnx.jit(lambda m, t: m(t)[0])(model, toks)
    optimizer = make_optimizer(model)
    losses = train_step(model, optimizer, toks)
    after = nnx.jit(lambda m, t: m(t)[0])(model, toks)
    if mesh is not None:
        logits, after = multihost_utils.process_allgather((logits, after), tiled=True)
    return np.asarray(logits), float(np.asarray(losses["cross_entropy"])), np.asarray(after)


mesh = make_mesh((2, 4))
logits, loss, after = run(mesh)
result = {
    "process": process_id,
    "global_devices": jax.device_count(),
    "local_devices": jax.local_device_count(),
    "mesh_devices_of_other_processes": sum(
        d.process_index != process_id for d in mesh.devices.flat
    ),
    "loss": loss,
}
# Every process holds the gathered mesh results; the one-device reference is the same
# computation in both, so only process 0 runs it (the other's core stays free).
np.savez(out / f"mesh{process_id}.npz", logits=logits, after=after)
if process_id == 0:
    logits_1, result["loss_single"], after_1 = run(None)
    np.savez(out / "single.npz", logits=logits_1, after=after_1)
print("RESULT" + json.dumps(result), flush=True)
jax.distributed.shutdown()
