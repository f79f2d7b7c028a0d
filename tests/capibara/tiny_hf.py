"""Tiny random transformers models for parity tests (model logits, engine generation)."""

from __future__ import annotations

# Small enough for CI, with GQA (4 query heads, 2 kv heads) and a non-default RoPE theta.
TINY_HF_CONFIG = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=5000.0,
    rms_norm_eps=1e-5,
)


def build_tiny(cls_name: str, config_name: str, **extra):
    """``transformers.<cls_name>(<config_name>(**TINY_HF_CONFIG, **extra))``, seeded, f32, eval."""
    import torch  # inside: callers importorskip the peers first
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**TINY_HF_CONFIG, **extra)
    return getattr(transformers, cls_name)(config).float().eval()
