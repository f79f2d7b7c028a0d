"""``CapibaraModel``: a Llama/Mistral/Qwen2/Mixtral-compatible decoder in Flax NNX.

    tokens [B, S] -> CapibaraEmbedding -> TransformerStack (DecoderBlock x L) -> OutputHead
                  -> logits [B, S, vocab] (f32), aux_losses {name: scalar}

Every op goes through ``kernels`` with the one ``config.implementation`` setting
(flash attention; block-sparse linears after ``capibara.sparsify``; grouped matmul in
MoE layers), so the same model runs with ``xla``, ``reference`` or ``pallas``.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from capibara.core import checkpoint
from capibara.core.config import CapibaraConfig
from capibara.core.layers import (
    Attention,
    PagedBatch,
    RMSNorm,
    SwiGLU,
    dtype_of,
    matmul_f32,
    rope_angles,
)
from capibara.core.mixture_of_depths import DualProcessRouter, DualProcessRouterConfig
from capibara.core.model_moe import make_moe_block
from capibara.core.router_base import RoutingContext


class CapibaraEmbedding(nnx.Module):
    """Token embedding ``[vocab, d]``; also the output projection when embeddings are tied."""

    def __init__(self, config: CapibaraConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=1.0)
        shape = (config.vocab_size, config.hidden_size)
        self.embedding = nnx.Param(init(rngs.params(), shape, dtype_of(config.param_dtype)))
        self.compute_dtype = dtype_of(config.compute_dtype)
        self.implementation = config.implementation

    def __call__(self, tokens):  # int [B, S] -> [B, S, d]
        return jnp.take(self.embedding.get_value(), tokens, axis=0).astype(self.compute_dtype)

    def attend(self, x):  # [B, S, d] -> f32 [B, S, vocab]
        table = self.embedding.get_value().astype(self.compute_dtype)
        # "bsd,vd->bsv"
        return matmul_f32(x, table, w_transposed=True, implementation=self.implementation)


class DecoderBlock(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``h + mlp(norm(h))`` (SwiGLU or MoE).

    In a Mixture-of-Depths layer (``config.mod_layers``) a ``DualProcessRouter`` sends
    the top ``mod_capacity`` fraction of each sequence through this whole block (the
    selected tokens attend among themselves, in order, at their original RoPE
    positions) and the rest along the fast path.
    """

    def __init__(self, config: CapibaraConfig, layer: int, *, rngs: nnx.Rngs):
        param_dtype = dtype_of(config.param_dtype)
        self.input_layernorm = RMSNorm(
            config.hidden_size, eps=config.norm_eps, param_dtype=param_dtype
        )
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps=config.norm_eps, param_dtype=param_dtype
        )
        self.is_moe = config.is_moe_layer(layer)
        self.mlp = make_moe_block(config, rngs=rngs) if self.is_moe else SwiGLU(config, rngs=rngs)
        if layer in config.mod_layers:
            mod_config = DualProcessRouterConfig(
                capacity=config.mod_capacity, fast_path=config.mod_fast_path
            )
            self.mod_router = DualProcessRouter(config.hidden_size, mod_config, rngs=rngs)
        else:
            self.mod_router = None

    def _update(self, x, positions, segment_ids, context):
        """What the block adds to ``x [B, S, d]``, and the MoE aux losses."""
        h = x + self.self_attn(self.input_layernorm(x), positions, segment_ids)
        normed = self.post_attention_layernorm(h)
        if self.is_moe:
            out, routing = self.mlp(normed, context)
            aux = routing.aux_losses
        else:
            out, aux = self.mlp(normed), {}
        return h + out.astype(h.dtype) - x, aux

    def __call__(self, x, positions, segment_ids=None, *, training=False, padding_mask=None):
        """``x [B, S, d]`` -> (``[B, S, d]``, aux_losses dict)."""
        context = RoutingContext(training=training, padding_mask=padding_mask)
        if self.mod_router is None:
            update, aux = self._update(x, positions, segment_ids, context)
            return x + update, aux
        if segment_ids is not None:
            raise ValueError("segment_ids (packed sequences) are not supported in MoD layers")
        inner_aux: dict[str, jax.Array] = {}

        def slow_fn(x_slow, index):  # [B, c, d], int [B, c] -> [B, c, d]
            # The slow tokens' MoE sees no padding: MoD already routed padding to "fast".
            update, aux = self._update(
                x_slow,
                jnp.take_along_axis(positions, index, axis=1),
                None,
                RoutingContext(training=training),
            )
            inner_aux.update(aux)
            return update

        y, routing = self.mod_router(x, slow_fn, context)
        return y, {**inner_aux, **routing.aux_losses}

    def forward_paged(self, x, kv, batch: PagedBatch, rotary):
        """Serving step of one block: ``x [N, d]`` -> (``[N, d]``, new kv, expert load).

        ``rotary``: the step's RoPE angles, as ``Attention.forward_paged`` takes them.

        Routing runs with ``decode=True`` (dropless, batch-invariant; see
        ``capibara.core.routing``). The expert load is f32 ``[E]`` tokens per expert
        over the non-padding tokens, or ``None`` for a dense block.
        """
        if self.mod_router is not None:
            raise ValueError(
                "Mixture-of-Depths layers cannot be served from a KV cache: a skipped "
                "token writes no k/v, so the cache layout would depend on routing"
            )
        attn, kv = self.self_attn.forward_paged(self.input_layernorm(x), kv, batch, rotary)
        h = x + attn
        normed = self.post_attention_layernorm(h)
        if not self.is_moe:
            return h + self.mlp(normed), kv, None
        context = RoutingContext(decode=True, padding_mask=batch.padding[None])
        out, routing = self.mlp(normed[None], context)
        return h + out[0].astype(h.dtype), kv, routing.stats["tokens_per_expert"]


class TransformerStack(nnx.Module):
    """``num_layers`` decoder blocks; their auxiliary losses are summed per name."""

    def __init__(self, config: CapibaraConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [DecoderBlock(config, i, rngs=rngs) for i in range(config.num_layers)]
        )

    def __call__(self, x, positions, segment_ids=None, *, training=False, padding_mask=None):
        aux_losses: dict[str, jax.Array] = {}
        for layer in self.layers:
            x, aux = layer(x, positions, segment_ids, training=training, padding_mask=padding_mask)
            for name, value in aux.items():
                aux_losses[name] = aux_losses.get(name, 0.0) + value
        return x, aux_losses


class OutputHead(nnx.Module):
    """Final RMSNorm and the vocabulary projection (tied to the embedding, or its own)."""

    def __init__(self, config: CapibaraConfig, *, rngs: nnx.Rngs):
        param_dtype = dtype_of(config.param_dtype)
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps, param_dtype=param_dtype)
        if config.tie_embeddings:
            self.lm_head = None
        else:
            init = nnx.initializers.normal(stddev=config.hidden_size**-0.5)
            shape = (config.hidden_size, config.vocab_size)
            self.lm_head = nnx.Param(init(rngs.params(), shape, param_dtype))
        self.compute_dtype = dtype_of(config.compute_dtype)
        self.implementation = config.implementation
        self.lm_head_out_in = False  # the serving layout, see use_out_in_layout

    def use_out_in_layout(self) -> None:
        """Stores an untied ``lm_head`` as ``[vocab, d]``, as ``Linear.use_out_in_layout``."""
        if self.lm_head is not None and not self.lm_head_out_in:
            self.lm_head = nnx.Param(self.lm_head.get_value().T)
            self.lm_head_out_in = True

    def __call__(self, x, embedding: CapibaraEmbedding):  # [B, S, d] -> f32 [B, S, vocab]
        x = self.norm(x)
        if self.lm_head is None:
            return embedding.attend(x)
        head = self.lm_head.get_value().astype(self.compute_dtype)
        return matmul_f32(  # "bsd,dv->bsv"
            x, head, w_transposed=self.lm_head_out_in, implementation=self.implementation
        )


class CapibaraModel(nnx.Module):
    """The decoder-only language model.

    Example:
      model = CapibaraModel(preset("tiny"), rngs=nnx.Rngs(0))
      logits, aux_losses = model(tokens)              # tokens int32 [B, S]
    """

    def __init__(self, config: CapibaraConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = CapibaraEmbedding(config, rngs=rngs)
        self.stack = TransformerStack(config, rngs=rngs)
        self.head = OutputHead(config, rngs=rngs)

    def __call__(
        self, tokens, *, positions=None, segment_ids=None, training=False, padding_mask=None
    ):
        """Runs the model.

        Args:
          tokens: int ``[B, S]``.
          positions: int ``[B, S]`` RoPE positions; default ``arange(S)`` per row.
          segment_ids: int ``[B, S]`` for packed sequences: a token attends only within
            its own segment (positions should restart per segment).
          training: routers add noise / update balancing state and report aux losses.
          padding_mask: bool ``[B, S]``, True for padding: not counted in expert load.

        Returns:
          ``(logits f32 [B, S, vocab], aux_losses {name: f32 scalar})``.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape={tokens.shape}")
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        x = self.embed(tokens)
        x, aux_losses = self.stack(
            x, positions, segment_ids, training=training, padding_mask=padding_mask
        )
        return self.head(x, self.embed), aux_losses

    def forward_with_cache(self, tokens, kv_cache, batch: PagedBatch):
        """One serving step over a paged KV cache.

        Args:
          tokens: int ``[N]`` flat tokens in ``batch``'s layout (decode rows, then
            right-padded prefill rows).
          kv_cache: one ``(k_pages, v_pages)`` pair per layer, each
            ``[Hkv, P, page_size, D]``.
          batch: ``PagedBatch``: positions, where each token's k/v goes, lengths and
            page tables, which logits to return.

        Returns:
          ``(logits f32 [R, vocab], new kv_cache, expert_load f32 [moe_layers, E] or
          None)`` with ``R = batch.logit_index.shape[0]``.
        """
        x = self.embed(tokens[None])[0]  # [N, d]
        new_cache, loads = [], []
        # One RoPE table for the step: every layer has the same frequencies (each keeps
        # its own copy, so XLA would not merge per-layer tables).
        rotary = rope_angles(batch.positions, self.stack.layers[0].self_attn.inv_freq)
        for layer, kv in zip(self.stack.layers, kv_cache, strict=True):
            x, kv, load = layer.forward_paged(x, kv, batch, rotary)
            new_cache.append(kv)
            if load is not None:
                loads.append(load)
        logits = self.head(x[batch.logit_index][None], self.embed)[0]
        return logits, new_cache, (jnp.stack(loads) if loads else None)

    @classmethod
    def from_pretrained(
        cls, path: str | pathlib.Path | None = None, *, seed: int = 0, **config_overrides
    ):
        """Loads a GGUF file, a Hugging Face (Llama, Mistral, Mixtral, Qwen2) or a
        Capibara checkpoint, with its tokenizer (``model.tokenizer``).

        Built abstractly (``nnx.eval_shape``) and filled one tensor at a time: no random
        initialisation, peak memory about the weights' size. A GGUF file is converted
        once into ``~/.cache/capibara`` (``$CAPIBARA_CACHE_DIR``); see
        ``capibara.core.pretrained``.

        Args:
          path: a ``.gguf`` file (architecture ``llama``/``qwen2``; F32, F16, BF16,
            Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and K-quant tensors, dequantized to f32); a
            directory with ``config.json`` or ``capibara_config.json`` and
            ``model.safetensors`` (or shards with their index); or None for the default
            model, SmolLM2-135M-Instruct.
          seed: seeds the buffers that are not parameters (RNG streams).
          config_overrides: config fields to change, e.g. ``param_dtype="bfloat16"``.

        Raises:
          ValueError: naming the missing, unexpected or mis-shaped tensors, or the
            unsupported architecture, tensor or quantization type of a GGUF file.
        """
        from capibara.core import pretrained

        return pretrained.from_pretrained(cls, path, seed=seed, **config_overrides)

    def save_pretrained(self, path: str | pathlib.Path) -> None:
        """Writes ``model.safetensors`` + ``capibara_config.json`` for ``from_pretrained``."""
        checkpoint.save(self, path)
