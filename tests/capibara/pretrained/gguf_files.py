"""Tiny GGUF files written the way llama.cpp's converter writes them, for the loader tests.

``write_gguf`` takes a transformers Llama/Qwen2 model and writes its tensors in GGUF
naming, quantized per tensor with ``gguf.quants.quantize`` (q/k rows permuted for
llama.cpp's rotary layout, as ``convert_hf_to_gguf.LlamaModel.permute`` does), and
returns the dequantized weights under Hugging Face names: the reference model loads
those, so both sides hold exactly the same numbers.
"""

from __future__ import annotations

import pathlib

import numpy as np

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf: str) -> str:
    if hf in _TOP:
        return _TOP[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: rows ``(h, 2, D/2)`` -> ``(h, D/2, 2)``."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def quant_for(name: str, scheme: dict[str, str]) -> str:
    """The quantization of tensor ``name``: the first ``scheme`` key found in it."""
    if name.endswith(("norm.weight", ".bias")):
        return "F32"  # llama.cpp keeps 1-D tensors in F32
    for key, qtype in scheme.items():
        if key in name:
            return qtype
    return scheme.get("*", "F32")


def write_gguf(
    path: pathlib.Path,
    hf_model,
    *,
    scheme: dict[str, str],
    arch: str = "llama",
    extra_tensors: dict[str, tuple[np.ndarray, str]] | None = None,
    tokenizer=None,
) -> dict[str, np.ndarray]:
    """Writes ``hf_model`` as a GGUF file; returns ``{hf_name: dequantized f32 weight}``.

    Args:
      scheme: ``{substring of the HF name: quant type}`` with ``"*"`` the default, e.g.
        ``{"embed": "Q8_0", "mlp": "Q4_1", "*": "Q4_0"}``.
      arch: ``general.architecture`` written (``llama`` permutes q/k, ``qwen2`` not).
      extra_tensors: ``{gguf_name: (raw array, quant type name)}`` written as is.
      tokenizer: ``(tokens, token_types, merges, chat_template)`` to write, or None.
    """
    import gguf
    from gguf.quants import dequantize, quantize

    c = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    if tokenizer is not None:
        tokens, types, merges, template = tokenizer
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_chat_template(template)
    reference = {}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = tensor.detach().float().numpy()
        qtype = gguf.GGMLQuantizationType[quant_for(name, scheme)]
        # Quantization is per row block; the permutation moves whole rows, so the
        # dequantized file tensor is the permuted dequantized weight.
        reference[name] = dequantize(quantize(w, qtype), qtype).reshape(w.shape)
        stored = w
        if arch == "llama" and ".q_proj." in name:
            stored = _permute(w, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            stored = _permute(w, c.num_key_value_heads)
        writer.add_tensor(gguf_name(name), quantize(stored, qtype), raw_dtype=qtype)
    for name, (raw, qtype) in (extra_tensors or {}).items():
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference
