"""Logit parity with transformers' PyTorch models on tiny random checkpoints.

Each test builds a small random model with transformers, saves it with
``save_pretrained`` (real safetensors + config.json), loads it with
``CapibaraModel.from_pretrained`` and compares f32 logits on the same tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from capibara.core.model import CapibaraModel  # noqa: E402
from tests.capibara.tiny_hf import TINY_HF_CONFIG, build_tiny  # noqa: E402

MAX_ABS_DIFF = 1e-4  # the parity bound for f32 logits


def _tokens(batch=2, seq=17):
    return np.random.default_rng(0).integers(0, TINY_HF_CONFIG["vocab_size"], (batch, seq))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def _check(hf_model, tmp_path, **overrides):
    torch.manual_seed(0)
    hf_model.eval()
    hf_model.save_pretrained(tmp_path)
    tokens = _tokens()
    expected = _hf_logits(hf_model, tokens)
    model = CapibaraModel.from_pretrained(tmp_path, implementation="xla", **overrides)
    logits, _ = model(jnp.asarray(tokens, jnp.int32))
    diff = np.abs(np.asarray(logits) - expected).max()
    assert diff <= MAX_ABS_DIFF, f"max |logits - transformers| = {diff:.2e}"
    return model


def test_llama(tmp_path):
    _check(build_tiny("LlamaForCausalLM", "LlamaConfig"), tmp_path)


def test_llama_tied_embeddings_and_llama3_rope_scaling(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    model = build_tiny(
        "LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=True, rope_scaling=scaling
    )
    capibara = _check(model, tmp_path)
    assert capibara.config.tie_embeddings


def test_qwen2_with_qkv_bias(tmp_path):
    model = build_tiny("Qwen2ForCausalLM", "Qwen2Config")
    with torch.no_grad():  # random init leaves biases at zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    _check(model, tmp_path)


def test_mistral(tmp_path):
    _check(build_tiny("MistralForCausalLM", "MistralConfig", sliding_window=None), tmp_path)


def test_sharded_checkpoint(tmp_path):
    model = build_tiny("LlamaForCausalLM", "LlamaConfig")
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    tokens = _tokens()
    loaded = CapibaraModel.from_pretrained(tmp_path, implementation="xla")
    logits, _ = loaded(jnp.asarray(tokens, jnp.int32))
    assert np.abs(np.asarray(logits) - _hf_logits(model.eval(), tokens)).max() <= MAX_ABS_DIFF


def test_mixtral(tmp_path):
    model = build_tiny(
        "MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2
    )
    capibara = _check(model, tmp_path)
    assert capibara.config.num_experts == 4


def test_save_pretrained_round_trip(tmp_path):
    model = build_tiny(
        "MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2
    )
    model.save_pretrained(tmp_path / "hf")
    capibara = CapibaraModel.from_pretrained(tmp_path / "hf", implementation="xla")
    capibara.save_pretrained(tmp_path / "capibara")
    reloaded = CapibaraModel.from_pretrained(tmp_path / "capibara")
    assert reloaded.config == capibara.config
    tokens = jnp.asarray(_tokens(), jnp.int32)
    np.testing.assert_array_equal(reloaded(tokens)[0], capibara(tokens)[0])


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = build_tiny("LlamaForCausalLM", "LlamaConfig")
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"
        r".*unexpected tensors: model\.layers\.0\.extra\.weight",
    ):
        CapibaraModel.from_pretrained(tmp_path)


def test_shape_mismatch_names_the_hf_tensor_and_its_file_shape(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = build_tiny("LlamaForCausalLM", "LlamaConfig")  # d=64, SwiGLU width 96
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["model.layers.1.mlp.up_proj.weight"].shape == (96, 64)  # torch [out, in]
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((96, 48), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        CapibaraModel.from_pretrained(tmp_path)
    message = str(info.value)
    assert message.endswith(
        "shape mismatches: model.layers.1.mlp.up_proj.weight: shape (96, 48) in the "
        "checkpoint, the model expects (96, 64)"
    )
    assert "stack.layers" not in message and "(48, 96)" not in message
