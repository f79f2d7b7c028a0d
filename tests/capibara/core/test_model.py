"""CapibaraModel: implementations agree, packing, mixed precision, MoE and MoD layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capibara.core.config import preset
from capibara.core.model import CapibaraModel
from capibara.kernels.testing import assert_close


def _model(name="tiny", **overrides):
    return CapibaraModel(preset(name, **overrides), rngs=nnx.Rngs(0))


def _tokens(batch=2, seq=16, vocab=256, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, seq)), jnp.int32)


# (preset, overrides, also run the Pallas kernels interpreted?) -- interpreting every
# kernel of a whole model is slow, so the two main configs carry that check.
CONFIGS = [
    pytest.param("tiny", {}, True, id="dense"),
    pytest.param("tiny-moe", {}, True, id="moe"),
    pytest.param("tiny-moe", {"mod_layers": (1,), "mod_capacity": 0.5}, False, id="moe+mod"),
    pytest.param("tiny", {"sliding_window": 5, "attention_bias": True}, False, id="window+bias"),
]


@pytest.mark.parametrize("name,overrides,with_pallas", CONFIGS)
def test_implementations_give_the_same_logits(name, overrides, with_pallas):
    tokens = _tokens()
    ref, ref_aux = _model(name, implementation="reference", **overrides)(tokens)
    xla, xla_aux = _model(name, implementation="xla", **overrides)(tokens)
    assert_close(xla, ref, jnp.float32, scale=10)
    assert set(xla_aux) == set(ref_aux)
    if with_pallas:
        model = _model(name, implementation="pallas", interpret_kernels=True, **overrides)
        assert_close(model(tokens)[0], ref, jnp.float32, scale=10)


def test_moe_and_mod_layers_report_aux_losses_in_training():
    model = _model("tiny-moe", mod_layers=(0,), implementation="xla")
    _, aux = model(_tokens(), training=True)
    assert {"load_balance", "predictor_bce"} <= set(aux)
    assert all(np.isfinite(float(v)) for v in aux.values())


def test_packed_sequences_equal_separate_runs():
    model = _model(implementation="xla")
    a, b = _tokens(1, 7, seed=1), _tokens(1, 9, seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.asarray([[0] * 7 + [1] * 9], jnp.int32)
    positions = jnp.asarray([list(range(7)) + list(range(9))], jnp.int32)
    logits, _ = model(packed, positions=positions, segment_ids=segments)
    assert_close(logits[:, :7], model(a)[0], jnp.float32, scale=10)
    assert_close(logits[:, 7:], model(b)[0], jnp.float32, scale=10)


# bf16 compute rounds activations to 8 mantissa bits at every layer; over this tiny
# model that stays within 3% of the logits' range.
BF16_RELATIVE_TOLERANCE = 0.03


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_compute_stays_close_to_f32(param_dtype):
    tokens = _tokens()
    f32, _ = _model(implementation="xla")(tokens)
    model = _model(implementation="xla", compute_dtype="bfloat16", param_dtype=param_dtype)
    # Same weights as the f32 model (rounded to bf16 when stored in bf16).
    f32_params = nnx.state(_model(implementation="xla"), nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p.astype(param_dtype), f32_params))
    bf16, _ = model(tokens)
    assert bf16.dtype == jnp.float32  # logits are always f32
    error = float(jnp.max(jnp.abs(bf16 - f32)) / jnp.max(jnp.abs(f32)))
    assert error <= BF16_RELATIVE_TOLERANCE, error


def test_causal_prefix_logits_do_not_depend_on_later_tokens():
    model = _model("tiny-moe", implementation="xla")
    tokens = _tokens(1, 12)
    changed = tokens.at[0, 8:].set((tokens[0, 8:] + 1) % 256)
    assert_close(model(changed)[0][:, :8], model(tokens)[0][:, :8], jnp.float32, scale=10)


def test_gradients_reach_every_parameter():
    model = _model("tiny-moe", mod_layers=(1,), implementation="xla")
    tokens = _tokens()

    def loss(model):
        logits, aux = model(tokens, training=True)
        return jnp.mean(logits**2) + sum(aux.values())

    grads = nnx.grad(loss)(model)
    for path, g in nnx.to_flat_state(nnx.state(grads, nnx.Param)):
        assert float(jnp.max(jnp.abs(g.get_value()))) > 0, f"no gradient reaches {path}"


def test_bad_tokens_rank():
    with pytest.raises(ValueError, match=r"tokens must be \[batch, seq\]"):
        _model()(jnp.zeros((4,), jnp.int32))
