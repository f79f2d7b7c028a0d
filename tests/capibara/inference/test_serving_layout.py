"""The engine's ``[out, in]`` copy of a model: same outputs, the original untouched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_helpers import make_engine, prompts
from flax import nnx

from capibara.core import checkpoint
from capibara.core.config import preset
from capibara.core.inference import EngineConfig, SamplingParams
from capibara.core.inference.serving_layout import out_in_copy
from capibara.core.model import CapibaraModel
from capibara.kernels.decode_matmul import native as decode_matmul_native
from capibara.kernels.testing import assert_close
from capibara.sparsity import sparsify


def _model(dtype: str, tie: bool):
    config = preset("tiny", tie_embeddings=tie, param_dtype=dtype, compute_dtype=dtype)
    return CapibaraModel(config, rngs=nnx.Rngs(1))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_copy_computes_the_same_logits_and_leaves_the_model_alone(dtype, tie):
    model = _model(dtype, tie)
    up = model.stack.layers[0].mlp.up_proj
    before = up.kernel.get_value()
    copy = out_in_copy(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 9)))
    # One row at a time too: few-row bf16 products take the native kernel on CPU.
    for t in (tokens, tokens[:1, :1]):
        assert_close(copy(t)[0], model(t)[0], dtype, scale=4.0)
    copied = copy.stack.layers[0].mlp.up_proj
    assert copied.kernel_out_in and copied.kernel.get_value().shape == before.shape[::-1]
    assert not up.kernel_out_in and up.kernel.get_value() is before
    np.testing.assert_array_equal(copied.dense_kernel(), before)
    if not tie:
        assert copy.head.lm_head_out_in and not model.head.lm_head_out_in
    # Everything else is shared, not copied.
    assert copy.embed.embedding.get_value() is model.embed.embedding.get_value()


def test_engine_tokens_do_not_depend_on_the_layout():
    model = _model("float32", tie=True)
    batch = prompts(4, seed=3)
    params = SamplingParams(max_tokens=6)
    runs = []
    for out_in in (False, True):
        engine = make_engine(model, out_in_weights=out_in)
        try:
            runs.append([g.token_ids for g in engine.generate_batch(batch, params)])
        finally:
            engine.close()
    assert runs[0] == runs[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_layout_is_out_in_where_the_native_kernel_runs(dtype):
    engine = make_engine(_model(dtype, tie=False))
    try:
        linear = engine._runner.model.stack.layers[0].mlp.up_proj
        native_here = jax.default_backend() == "cpu" and decode_matmul_native.available()
        assert linear.kernel_out_in == (dtype == "bfloat16" and native_here)
    finally:
        engine.close()


def test_serving_copy_cannot_be_saved():
    copy = out_in_copy(_model("float32", tie=True))
    with pytest.raises(ValueError, match="serving copy"):
        checkpoint.state_tensors(copy)


def test_sparse_linears_keep_their_layout():
    config = preset("tiny", intermediate_size=256, hidden_size=128)
    model = CapibaraModel(config, rngs=nnx.Rngs(0))
    sparsify(model, 0.5, block_shape=(64, 64))
    copy = out_in_copy(model)
    mlp = copy.stack.layers[0].mlp
    assert mlp.up_proj.sparse_layout is not None and not mlp.up_proj.kernel_out_in
    assert copy.stack.layers[0].self_attn.q_proj.kernel_out_in
    with pytest.raises(ValueError, match="serving layout"):
        copy.stack.layers[0].self_attn.q_proj.make_sparse(None)


def test_config_rejects_a_non_bool():
    with pytest.raises(TypeError, match="out_in_weights"):
        EngineConfig(out_in_weights="yes")
