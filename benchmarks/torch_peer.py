"""transformers' PyTorch Llama holding a CapibaraModel's weights: the peer of model benches."""

from __future__ import annotations

from capibara.core import checkpoint


def llama_with_weights_of(model, *, max_positions: int, dtype: str):
    """A ``transformers.LlamaForCausalLM`` with ``model``'s (dense Llama) weights, in eval mode.

    The weights go through the same name map as checkpoints, so both sides compute
    with identical parameters. ``dtype`` is ``"float32"`` or ``"bfloat16"``.
    """
    import torch
    import transformers

    config = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        max_position_embeddings=max_positions,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    state = {k: torch.from_numpy(v) for k, v in checkpoint.state_tensors(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    return hf.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
