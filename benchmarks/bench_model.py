"""CapibaraModel forward (prefill) of the ``small`` config (~125M) at 512 tokens.

The same random weights run in transformers' PyTorch ``LlamaForCausalLM`` (the
baseline) and in Capibara (``implementation=None``: the xla kernels on CPU), in one
process; the note gives tokens/s. FLOPs: 2 per weight per token (the tied embedding
counted once, as the output head) plus causal attention 2·S²·D·H per layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.torch_peer import llama_with_weights_of
from capibara.core.config import preset
from capibara.core.model import CapibaraModel

SEQ = 512
DTYPES = ["float32", "bfloat16"]


def _flops(config) -> float:
    weights = config.num_parameters() - config.hidden_size * (config.num_layers * 2 + 1)
    attention = 2 * SEQ * SEQ * config.resolved_head_dim * config.num_heads * config.num_layers
    return 2.0 * weights * SEQ + attention


@functools.cache
def _models(dtype: str):
    config = preset("small", compute_dtype=dtype)
    model = CapibaraModel(config, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, SEQ))
    return config, model, tokens


@functools.cache
def _torch_model(dtype: str):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    _, model, _ = _models(dtype)
    return llama_with_weights_of(model, max_positions=SEQ, dtype=dtype)


@functools.cache
def _expected(dtype: str):
    """f32 transformers logits: the value every row is checked against."""
    import torch

    _, _, tokens = _models(dtype)
    with torch.no_grad():
        return _torch_model("float32")(torch.from_numpy(tokens)).logits.float().numpy()


def _row(measure, fn, dtype, impl, **kw):
    config, _, _ = _models(dtype)
    flops = _flops(config)
    expected = _expected(dtype)
    out = measure(
        fn,
        op="model forward",
        shape=f"small(125M) 1x{SEQ}",
        dtype=dtype,
        impl=impl,
        flops=flops,
        expected=expected,
        tol_dtype=jnp.dtype(dtype),
        tol_scale=float(np.abs(expected).max()) * (4 if dtype == "bfloat16" else 10),
        rounds=3,
        **kw,
    )
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def bench_transformers(measure, benchmark, dtype):
    import torch

    hf = _torch_model(dtype)
    _, _, tokens = _models(dtype)
    tokens_t = torch.from_numpy(tokens)

    def forward():
        with torch.no_grad():
            return hf(tokens_t).logits.float().numpy()

    _row(
        measure,
        forward,
        dtype,
        "transformers (torch)",
        baseline=True,
        note=f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    )
    benchmark.extra_info["note"] += f"; {SEQ / benchmark.stats.stats.median:.0f} tokens/s"


@pytest.mark.parametrize("dtype", DTYPES)
def bench_capibara(measure, benchmark, dtype):
    _, model, tokens = _models(dtype)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t)[0])
    tokens_j = jnp.asarray(tokens, jnp.int32)
    _row(
        measure,
        lambda: forward(state, tokens_j),
        dtype,
        "capibara (auto)",
        note=f"{jax.default_backend()}: xla kernels",
    )
    benchmark.extra_info["note"] += f"; {SEQ / benchmark.stats.stats.median:.0f} tokens/s"
