"""Tiny random GGUF files (real format, written with ``gguf.GGUFWriter``, quantized with
``gguf.quants``, q/k permuted as llama.cpp stores them) load through
``CapibaraModel.from_pretrained`` and give transformers' logits on the same weights;
bad files fail naming the bad architecture, tensor or quantization type."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from gguf_files import write_gguf  # noqa: E402

from capibara.core import pretrained  # noqa: E402
from capibara.core.model import CapibaraModel  # noqa: E402
from tests.capibara.tiny_hf import TINY_HF_CONFIG, build_tiny  # noqa: E402

MIXED = {
    "embed": "Q8_0",
    "self_attn.o_proj": "F16",
    "self_attn": "Q4_0",
    "mlp": "Q4_1",
    "*": "Q8_0",
}
CASES = {
    # name: (HF class, config class, extra config, arch written, quantization scheme)
    "llama-mixed-quant-untied": ("LlamaForCausalLM", "LlamaConfig", {}, "llama", MIXED),
    "llama-f32-tied": (
        "LlamaForCausalLM",
        "LlamaConfig",
        {"tie_word_embeddings": True},
        "llama",
        {"*": "F32"},
    ),
    "llama-q4_1-tied": (
        "LlamaForCausalLM",
        "LlamaConfig",
        {"tie_word_embeddings": True},
        "llama",
        {"*": "Q4_1"},
    ),
    "qwen2-bias-f16": ("Qwen2ForCausalLM", "Qwen2Config", {}, "qwen2", {"*": "F16"}),
}


def _hf_with(reference: dict[str, np.ndarray], hf):
    """``hf`` holding the dequantized weights (tied heads follow the embedding)."""
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in reference.items()}
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    return hf


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_logits_equal_transformers_on_the_dequantized_weights(tmp_path, case):
    cls_name, config_name, extra, arch, scheme = CASES[case]
    hf = build_tiny(cls_name, config_name, **extra)
    path = tmp_path / "tiny.gguf"
    reference = write_gguf(path, hf, scheme=scheme, arch=arch)
    hf = _hf_with(reference, hf)

    model = CapibaraModel.from_pretrained(path, implementation="xla")
    assert model.config.tie_embeddings == bool(extra.get("tie_word_embeddings", False))
    assert model.config.attention_bias == (arch == "qwen2")
    assert model.config.rope_theta == TINY_HF_CONFIG["rope_theta"]
    assert model.tokenizer is None  # the file has no tokenizer.ggml.* metadata

    tokens = np.random.default_rng(0).integers(0, TINY_HF_CONFIG["vocab_size"], (2, 19))
    ours, _ = model(tokens.astype(np.int32))
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), want, atol=2e-5, rtol=1e-4)


def test_second_load_reads_the_cache_keyed_by_the_file_hash(tmp_path, capibara_cache):
    hf = build_tiny("LlamaForCausalLM", "LlamaConfig")
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf, scheme={"*": "Q8_0"})
    entry = pretrained.cached_gguf(path)
    assert entry.parent == capibara_cache and pretrained.file_sha256(path)[:32] in entry.name
    stamp = (entry / "model.safetensors").stat().st_mtime_ns
    assert pretrained.cached_gguf(path) == entry
    assert (entry / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    a = CapibaraModel.from_pretrained(path, implementation="xla")
    b = CapibaraModel.from_pretrained(entry, implementation="xla")  # the directory itself
    np.testing.assert_array_equal(
        np.asarray(a.embed.embedding.get_value()), np.asarray(b.embed.embedding.get_value())
    )
    # A changed file is a new entry.
    write_gguf(path, hf, scheme={"*": "Q4_0"})
    assert pretrained.cached_gguf(path) != entry


def test_bf16_override_loads_bf16_weights(tmp_path):
    hf = build_tiny("LlamaForCausalLM", "LlamaConfig")
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf, scheme={"*": "F32"})
    model = CapibaraModel.from_pretrained(path, param_dtype="bfloat16")
    assert model.stack.layers[0].mlp.up_proj.kernel.get_value().dtype == np.dtype("bfloat16")


def test_unknown_tensor_is_named(tmp_path):
    hf = build_tiny("LlamaForCausalLM", "LlamaConfig")
    path = tmp_path / "extra.gguf"
    extra = {"blk.0.attn_qkv.weight": (np.zeros((4, 64), np.float32), "F32")}
    write_gguf(path, hf, scheme={"*": "F32"}, extra_tensors=extra)
    with pytest.raises(ValueError, match=r"unknown GGUF tensor 'blk\.0\.attn_qkv\.weight'"):
        CapibaraModel.from_pretrained(path)


def test_unsupported_quantization_type_is_named(tmp_path):
    hf = build_tiny("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=True)
    path = tmp_path / "q8_1.gguf"
    # Q8_1 (llama.cpp's activation format): blocks of 32 values in 40 bytes; gguf has no
    # dequantizer for it. Zero bytes are a well-formed tensor of that type.
    extra = {"output.weight": (np.zeros((97, 2 * 40), np.uint8), "Q8_1")}
    write_gguf(path, hf, scheme={"*": "F32"}, extra_tensors=extra)
    with pytest.raises(ValueError, match=r"tensor 'output\.weight' has quantization type Q8_1"):
        CapibaraModel.from_pretrained(path)


def test_wrong_architecture_is_named(tmp_path):
    hf = build_tiny("LlamaForCausalLM", "LlamaConfig")
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, hf, scheme={"*": "F32"}, arch="gpt2")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gpt2'"):
        CapibaraModel.from_pretrained(path)


def test_not_a_gguf_file_is_named(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"junk\.gguf is not a readable GGUF file"):
        CapibaraModel.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf does not exist"):
        CapibaraModel.from_pretrained(tmp_path / "missing.gguf")
