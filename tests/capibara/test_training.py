"""A few optax steps on the tiny MoE model lower the loss, through every kernel's gradient."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capibara.core.config import preset
from capibara.core.model import CapibaraModel
from capibara.sparsity import sparsify
from capibara.training import make_optimizer, train_step


def _task(batch=4, seq=16, vocab=256):
    """Sequences counting up by a per-row stride: learnable from the previous token."""
    rng = np.random.default_rng(0)
    start = rng.integers(0, vocab, (batch, 1))
    stride = rng.integers(1, 4, (batch, 1))
    return jnp.asarray((start + stride * np.arange(seq)) % vocab, jnp.int32)


@pytest.mark.parametrize(
    "implementation,interpret,steps",
    [("xla", False, 12), ("pallas", True, 3)],
    ids=["xla", "pallas-interpret"],
)
def test_training_lowers_the_loss(implementation, interpret, steps):
    # Layer 0 is MoE (grouped matmul), layer 1 a dense MLP made block-sparse; both
    # attend through flash attention: every kernel's backward is on the gradient path.
    config = preset(
        "tiny-moe",
        moe_layers=(0,),
        implementation=implementation,
        interpret_kernels=interpret,
        intermediate_size=64,
    )
    model = CapibaraModel(config, rngs=nnx.Rngs(0))
    report = sparsify(model, sparsity=0.5, block_shape=(32, 32))
    assert report.linears  # the dense layer's MLP is block-sparse now
    optimizer = make_optimizer(model, learning_rate=3e-3)
    tokens = _task()
    history = [train_step(model, optimizer, tokens) for _ in range(steps)]
    first, last = float(history[0]["cross_entropy"]), float(history[-1]["cross_entropy"])
    assert last < first, [float(h["cross_entropy"]) for h in history]
    assert "load_balance" in history[0]
