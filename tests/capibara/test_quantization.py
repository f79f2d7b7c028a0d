"""capibara.quantize: quantized linears give the logits of the same model holding the
dequantized weights as floats, and the engine serves the quantized model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capibara.core.config import preset
from capibara.core.inference import CapibaraInference, EngineConfig, SamplingParams
from capibara.core.layers import Linear
from capibara.core.model import CapibaraModel
from capibara.kernels.testing import assert_close
from capibara.quantization import quantize


def _model(**overrides):
    return CapibaraModel(preset("tiny", **overrides), rngs=nnx.Rngs(0))


def _tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)


def _dequantized_twin(quantized_model, **overrides):
    """A float model (same init) whose kernels are the quantized model's, dequantized."""
    twin = _model(**overrides)
    linears = dict(nnx.iter_graph(quantized_model))
    for path, module in nnx.iter_graph(twin):
        if isinstance(module, Linear) and linears[path].quant_format is not None:
            kernel = linears[path].dense_kernel()
            module.kernel.set_value(kernel.astype(module.kernel.get_value().dtype))
    return twin


@pytest.mark.parametrize(
    "implementation,interpret",
    [("xla", False), ("pallas", True)],
    ids=["xla", "pallas-interpret"],
)
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)], ids=["int8", "int4-g32"])
def test_quantized_model_equals_float_model_with_dequantized_weights(
    bits, group, implementation, interpret
):
    overrides = dict(implementation=implementation, interpret_kernels=interpret)
    model = _model(**overrides)
    float_logits = model(_tokens())[0]
    report = quantize(model, bits, group)
    assert len(report.linears) == 2 * 7  # 2 layers: q, k, v, o, gate, up, down
    twin = _dequantized_twin(model, **overrides)
    logits = model(_tokens())[0]
    assert_close(logits, twin(_tokens())[0], jnp.float32, scale=10)
    # Quantizing changed the model, by about the rounding error expected (measured on
    # this random tiny model: relative RMS 1.0 % for int8, 13 % for int4 groups of 32).
    rel = float(jnp.sqrt(jnp.mean((logits - float_logits) ** 2) / jnp.mean(float_logits**2)))
    assert 0 < rel < (0.03 if bits == 8 else 0.25), rel


def test_report_counts_the_bytes():
    model = _model()
    report = quantize(model, 4, 32)
    # f32 kernels: 4 bytes a weight -> half a byte + 8 bytes of scale and min per 32.
    assert report.ratio == pytest.approx((0.5 + 8 / 32) / 4)


def test_bad_requests_are_named():
    model = _model()
    with pytest.raises(ValueError, match="targets"):
        quantize(model, 8, targets=("embedding",))
    with pytest.raises(ValueError, match="bits"):
        quantize(model, 3)
    with pytest.raises(ValueError, match=r"stack.layers.0.mlp.gate_proj .*group=128"):
        quantize(model, 4, 128)  # tiny's d_model = 64
    assert all(  # and nothing was changed by the refused request
        m.quant_format is None for _, m in nnx.iter_graph(model) if isinstance(m, Linear)
    )
    quantize(model, 8)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, 8)


def test_the_engine_serves_a_quantized_model_like_its_forward_pass():
    model = _model(implementation="xla")
    quantize(model, 4, 32)
    prompt = [3, 14, 15, 92, 65]
    engine = CapibaraInference(model, EngineConfig(max_slots=2, max_seq_len=64, num_pages=16))
    try:
        out = engine.generate_batch([prompt], SamplingParams(max_tokens=6))[0]
    finally:
        engine.close()
    # Greedy decoding by full forward passes of the same quantized model.
    tokens = list(prompt)
    for _ in range(6):
        logits = model(jnp.asarray([tokens], jnp.int32))[0]
        tokens.append(int(jnp.argmax(logits[0, -1])))
    assert out.token_ids == tokens[len(prompt) :]
