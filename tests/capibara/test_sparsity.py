"""capibara.sparsify: block-sparse linears give the logits of the same pruned dense model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capibara.core.config import preset
from capibara.core.layers import Linear
from capibara.core.model import CapibaraModel
from capibara.kernels.testing import assert_close
from capibara.sparsity import sparsify


def _model(**overrides):
    return CapibaraModel(preset("tiny", **overrides), rngs=nnx.Rngs(0))


def _tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)


def _densified_twin(sparse_model, **overrides):
    """A dense model (same init) whose kernels are the sparse model's, zeros included."""
    twin = _model(**overrides)
    sparse_linears = dict(nnx.iter_graph(sparse_model))
    for path, module in nnx.iter_graph(twin):
        if isinstance(module, Linear) and sparse_linears[path].sparse_layout is not None:
            module.kernel.set_value(sparse_linears[path].dense_kernel())
    return twin


@pytest.mark.parametrize(
    "implementation,interpret",
    [("xla", False), ("pallas", True)],
    ids=["xla", "pallas-interpret"],
)
@pytest.mark.parametrize("targets", [("mlp",), ("mlp", "attention")], ids=["mlp", "mlp+attn"])
def test_sparse_model_equals_dense_model_with_pruned_weights(implementation, interpret, targets):
    overrides = dict(implementation=implementation, interpret_kernels=interpret)
    model = _model(**overrides)
    report = sparsify(model, sparsity=0.5, block_shape=(32, 32), targets=targets)
    assert len(report.linears) == 2 * (3 if targets == ("mlp",) else 7)
    twin = _densified_twin(model, **overrides)
    assert_close(model(_tokens())[0], twin(_tokens())[0], jnp.float32, scale=10)


def test_reported_reduction_is_exact():
    model = _model(intermediate_size=128)  # 64x128 and 128x64 kernels: 8 blocks of 32x32 each
    report = sparsify(model, sparsity=0.6562, block_shape=(32, 32))
    kept_blocks = round((1 - 0.6562) * 8)  # per kernel
    assert report.dense_params == 6 * 64 * 128
    assert report.kept_params == 6 * kept_blocks * 32 * 32
    assert report.reduction == pytest.approx(1 - kept_blocks / 8)


def test_pruning_keeps_the_largest_blocks():
    model = _model()
    dense = np.asarray(model.stack.layers[0].mlp.up_proj.kernel.get_value())
    sparsify(model, sparsity=0.75, block_shape=(32, 32))
    kept = model.stack.layers[0].mlp.up_proj.sparse_layout.mask
    norms = np.linalg.norm(dense.reshape(2, 32, 4, 32), axis=(1, 3))
    assert norms[kept].min() >= norms[~kept].max()


def test_bad_arguments():
    with pytest.raises(ValueError, match="targets"):
        sparsify(_model(), 0.5, targets=("embedding",))
    with pytest.raises(ValueError, match=r"sparsity=1\.5"):
        sparsify(_model(), 1.5)
    model = _model()
    sparsify(model, 0.5, (32, 32))
    with pytest.raises(ValueError, match="already block-sparse"):
        sparsify(model, 0.5, (32, 32))
