"""Building blocks of the decoder: RMSNorm, rotary embeddings, linears, attention, SwiGLU.

Numerics policy: parameters are stored in ``param_dtype``, cast to ``compute_dtype`` for
the matmuls; norms, softmax statistics and accumulation stay in f32 (the kernels
accumulate in f32 whatever their input dtype).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capibara import kernels
from capibara.core.config import CapibaraConfig
from capibara.kernels.bit_views import from_bits, to_bits
from capibara.kernels.block_sparse import BlockLayout, BlockSparseMatrix
from capibara.kernels.quantized_matmul import QuantizedWeight
from capibara.kernels.rope_kv_write.reference import rotate


def dtype_of(name: str):
    return jnp.dtype(name)


def last_axis(v: jax.Array, ndim: int) -> jax.Array:
    """``v [d]`` shaped ``[1, ..., 1, d]`` (``ndim`` dims) to broadcast over ``[..., d]``
    explicitly: the model runs under ``jax_numpy_rank_promotion="raise"``."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


class RMSNorm(nnx.Module):
    """``x / rms(x) * weight``, computed in f32, returned in ``x.dtype``."""

    def __init__(self, dim: int, *, eps: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):  # [..., dim]
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        weight = last_axis(self.weight.get_value().astype(jnp.float32), x.ndim)
        return (normed * weight).astype(x.dtype)


def matmul_f32(x, w, *, w_transposed: bool = False, implementation: str | None = None):
    """``x [..., k] @ w [k, n]`` (or ``w [n, k]`` if ``w_transposed``) -> f32 ``[..., n]``.

    Inputs in their own dtype, accumulation in f32, through ``capibara.kernels.decode_matmul``:
    on CPU the few-row bf16 products of decoding run its native kernel (about twice
    XLA's bf16 dot at batch 1), everything else XLA's dot. ``implementation`` is the
    model's setting: ``"xla"``/``"reference"`` pass through; ``"pallas"`` and ``None``
    let the op pick (it has no Pallas kernel).
    """
    return kernels.decode_matmul(
        x, w, w_transposed=w_transposed, implementation=portable_or_auto(implementation)
    )


def portable_or_auto(implementation: str | None) -> str | None:
    """The model's ``implementation`` setting for an op without a Pallas kernel:
    ``"xla"`` and ``"reference"`` pass through, anything else lets the op pick."""
    return implementation if implementation in ("xla", "reference") else None


class Linear(nnx.Module):
    """``x @ kernel (+ bias)``; ``kernel [in, out]`` dense, or block-sparse.

    After ``capibara.sparsify`` the ``kernel`` parameter holds only the stored blocks
    ``[nnz, bk, bn]`` and ``sparse_layout`` (static, hashable) says where they sit; the
    product runs through ``capibara.kernels.block_sparse_matmul``. Dense kernels go through
    ``capibara.kernels.decode_matmul`` (XLA's dot; on CPU its native kernel for a few bf16 rows),
    stored ``[out, in]`` in an engine's serving copy (``use_out_in_layout``). After
    ``capibara.quantize`` the ``kernel`` holds a ``QuantizedWeight``'s integer values
    (``kernel_scales``/``kernel_mins`` beside it, ``quant_format`` static) and the
    product runs through ``capibara.kernels.quantized_matmul``. All accumulate in f32
    and return ``compute_dtype``.
    """

    def __init__(
        self, d_in: int, d_out: int, *, config: CapibaraConfig, rngs: nnx.Rngs, bias: bool = False
    ):
        init = nnx.initializers.normal(stddev=1.0 / math.sqrt(d_in))
        param_dtype = dtype_of(config.param_dtype)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), param_dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if bias else None
        self.compute_dtype = dtype_of(config.compute_dtype)
        self.implementation = config.implementation
        self.interpret = config.interpret_kernels
        self.sparse_layout: BlockLayout | None = None
        self.kernel_out_in = False  # the serving layout, see use_out_in_layout
        # (bits, group, offset, (K, N)) once quantized (make_quantized), else None.
        self.quant_format: tuple[int, int, int, tuple[int, int]] | None = None
        # Data attributes (parameters once quantized), so marked while still None.
        self.kernel_scales = nnx.data(None)
        self.kernel_mins = nnx.data(None)

    def use_out_in_layout(self) -> None:
        """Stores a dense kernel as ``[out, in]`` (a transposed copy; no-op if sparse).

        The layout ``capibara.kernels.decode_matmul``'s CPU kernel streams fastest (each output a
        dot product of two contiguous rows: ~25 % less time per decode step than
        ``[in, out]`` for the ``small`` model). For serving copies of a model
        (``capibara.core.inference``); checkpoints, sharding and sparsity read ``[in, out]``.
        """
        if self.sparse_layout is None and self.quant_format is None and not self.kernel_out_in:
            self.kernel = nnx.Param(self.kernel.get_value().T)
            self.kernel_out_in = True

    def make_sparse(self, w: BlockSparseMatrix) -> None:
        """Replaces the kernel by the stored blocks of ``w`` (same ``[in, out]`` shape)."""
        if self.kernel_out_in:
            raise ValueError("make_sparse: the kernel is in the [out, in] serving layout")
        if tuple(w.shape) != tuple(self.kernel.get_value().shape):
            raise ValueError(
                f"block-sparse kernel shape {w.shape} != {self.kernel.get_value().shape}"
            )
        self.kernel = nnx.Param(w.blocks)
        self.sparse_layout = w.layout

    def make_quantized(self, w: QuantizedWeight) -> None:
        """Replaces the kernel by ``w`` (same ``[in, out]`` shape): integer values,
        f32 scales (and mins) as parameters, the format static."""
        if self.kernel_out_in or self.sparse_layout is not None or self.quant_format:
            raise ValueError(
                "make_quantized: the kernel must be a dense [in, out] float kernel, not "
                "sparse, quantized or in the [out, in] serving layout"
            )
        if tuple(w.shape) != tuple(self.kernel.get_value().shape):
            raise ValueError(f"quantized kernel shape {w.shape} != {self.kernel.get_value().shape}")
        self.kernel = nnx.Param(w.values)
        self.kernel_scales = nnx.Param(w.scales)
        self.kernel_mins = nnx.data(None) if w.mins is None else nnx.Param(w.mins)
        self.quant_format = (w.bits, w.group, w.offset, tuple(w.shape))

    def quantized_weight(self) -> QuantizedWeight | None:
        """The ``QuantizedWeight`` the kernel holds (``None`` if not quantized)."""
        if self.quant_format is None:
            return None
        bits, group, offset, shape = self.quant_format
        mins = None if self.kernel_mins is None else self.kernel_mins.get_value()
        values, scales = self.kernel.get_value(), self.kernel_scales.get_value()
        return QuantizedWeight(values, scales, mins, bits, group, offset, shape)

    def dense_kernel(self) -> jax.Array:
        """The ``[in, out]`` kernel, zeros where blocks were pruned, dequantized (in the
        parameter dtype of the scales, f32) where quantized."""
        if self.quant_format is not None:
            return self.quantized_weight().dequantize()
        if self.sparse_layout is None:
            kernel = self.kernel.get_value()
            return kernel.T if self.kernel_out_in else kernel
        return BlockSparseMatrix(self.kernel.get_value(), self.sparse_layout).to_dense()

    def __call__(self, x):  # [..., d_in] -> [..., d_out]
        x = x.astype(self.compute_dtype)
        kernel = self.kernel.get_value()
        if self.quant_format is not None:
            y = kernels.quantized_matmul(
                x,
                self.quantized_weight(),
                implementation=self.implementation,
                interpret=self.interpret,
            )
        elif self.sparse_layout is not None:
            y = kernels.block_sparse_matmul(
                x,
                BlockSparseMatrix(kernel.astype(self.compute_dtype), self.sparse_layout),
                implementation=self.implementation,
                interpret=self.interpret,
            )
        else:
            kernel = kernel.astype(self.compute_dtype)
            y = matmul_f32(
                x, kernel, w_transposed=self.kernel_out_in, implementation=self.implementation
            )
            y = y.astype(self.compute_dtype)
        if self.bias is not None:
            y = y + last_axis(self.bias.get_value().astype(self.compute_dtype), y.ndim)
        return y


# -- rotary position embeddings ---------------------------------------------------------


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (f32 numpy), with Llama-3 / linear scaling."""
    # numpy, not jnp: a constant of the module, computed once on the host.
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not scaling:
        return inv_freq.astype(np.float32)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv_freq / scaling["factor"]).astype(np.float32)
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    if kind in (None, "default"):
        return inv_freq.astype(np.float32)
    raise ValueError(f"rope_scaling: unsupported rope_type {kind!r} (supported: linear, llama3)")


def rope_angles(positions, inv_freq) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` of ``positions [...]`` times ``inv_freq``: f32 ``[..., D/2]`` each."""
    angles = positions.astype(jnp.float32)[..., None] * last_axis(inv_freq, positions.ndim + 1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, positions, inv_freq):
    """Rotates ``x [B, S, H, D]`` by ``positions [B, S]`` (half-split layout, as in HF)."""
    return rotate(x, *rope_angles(positions, inv_freq))


# -- attention and MLP -----------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedBatch:
    """One serving step's tokens laid out for the paged KV cache (all int32 unless noted).

    The step's ``N = Bd + Bp·S`` tokens are flat: first one token for each of the ``Bd``
    decode rows, then ``Bp`` prefill rows of ``S`` tokens each (right-padded). Every
    token writes its k/v to ``(write_pages[i], write_offsets[i])`` of the page pool
    before attending; padding tokens and idle rows write to a scratch page that no
    sequence reads.

    Attributes:
      positions: ``[N]`` RoPE position of each token.
      write_pages, write_offsets: ``[N]`` pool page and slot in it of each token's k/v.
      decode_lengths: ``[Bd]`` cached tokens of each decode row, this one included (0:
        an idle row, which sees nothing).
      decode_page_table: ``[Bd, pages_per_seq]``.
      prefill_lengths: ``[Bp]`` ``start + S``: query ``j`` of the row sits at ``start + j``.
      prefill_page_table: ``[Bp, pages_per_seq]``.
      logit_index: ``[R]`` flat index of the tokens whose logits the step returns.
      padding: bool ``[N]``, True for padding / idle tokens (not counted in expert load).
    """

    positions: jax.Array
    write_pages: jax.Array
    write_offsets: jax.Array
    decode_lengths: jax.Array
    decode_page_table: jax.Array
    prefill_lengths: jax.Array
    prefill_page_table: jax.Array
    logit_index: jax.Array
    padding: jax.Array

    @property
    def num_decode(self) -> int:
        return self.decode_lengths.shape[0]

    @property
    def num_prefill(self) -> int:
        return self.prefill_lengths.shape[0]


class Attention(nnx.Module):
    """GQA self-attention through ``capibara.kernels.flash_attention`` (causal, RoPE)."""

    def __init__(self, config: CapibaraConfig, *, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.resolved_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        bias = config.attention_bias
        self.q_proj = Linear(d, config.num_heads * hd, config=config, rngs=rngs, bias=bias)
        self.k_proj = Linear(d, config.num_kv_heads * hd, config=config, rngs=rngs, bias=bias)
        self.v_proj = Linear(d, config.num_kv_heads * hd, config=config, rngs=rngs, bias=bias)
        self.o_proj = Linear(config.num_heads * hd, d, config=config, rngs=rngs)
        self.inv_freq = rope_frequencies(hd, config.rope_theta, config.rope_scaling)
        self.sliding_window = config.sliding_window
        self.implementation = config.implementation
        self.interpret = config.interpret_kernels

    def project_qkv(self, x):
        """``x [B, S, d]`` -> ``q [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]`` (not rotated)."""
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        return q, k, v

    def __call__(self, x, positions, segment_ids=None):  # [B, S, d] -> [B, S, d]
        b, s, _ = x.shape
        q, k, v = self.project_qkv(x)
        rotary = rope_angles(positions, self.inv_freq)
        q, k = rotate(q, *rotary), rotate(k, *rotary)
        out = kernels.flash_attention(
            q,
            k,
            v,
            causal=True,
            segment_ids=None if segment_ids is None else (segment_ids, segment_ids),
            sliding_window=self.sliding_window,
            implementation=self.implementation,
            interpret=self.interpret,
        )
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))

    def forward_paged(self, x, kv: tuple[jax.Array, jax.Array], batch: PagedBatch, rotary):
        """Serving step: ``x [N, d]`` (``batch``'s flat layout) -> ``([N, d], new kv)``.

        ``rotary``: ``rope_angles(batch.positions, inv_freq)``, computed once for all the
        layers of a step (they share frequencies).

        Writes every token's roped k and v into the page pools ``kv = (k_pages,
        v_pages)``, each ``[Hkv, P, page_size, D]`` (``capibara.kernels.rope_kv_write``), then the
        decode rows attend through ``capibara.kernels.paged_attention`` and the prefill rows
        through ``capibara.kernels.paged_prefill_attention`` (causal within the chunk, onto the
        cache).
        """
        n = x.shape[0]
        q, k, v = self.project_qkv(x[:, None])  # [N, 1, H, D]: q as attention takes it
        k, v = k[:, 0], v[:, 0]
        k_pages, v_pages = kv
        dtype = k_pages.dtype
        # 16-bit pools go to the kernels as the uint16 bits they are stored as (these
        # bitcasts cancel with the step's own; a bf16 view handed to a custom call, or
        # scattered, would cost XLA:CPU a copy of the pool).
        # Written before attending: the attention kernels read a token's own k/v there.
        q, k_bits, v_bits = kernels.rope_kv_write(
            q,
            k,
            v,
            *rotary,
            to_bits(k_pages),
            to_bits(v_pages),
            batch.write_pages,
            batch.write_offsets,
            implementation=portable_or_auto(self.implementation),
        )
        q = q.astype(dtype)
        options = dict(
            sliding_window=self.sliding_window,
            implementation=self.implementation,
            interpret=self.interpret,
        )
        bd, bp = batch.num_decode, batch.num_prefill
        outs = []
        if bd:
            outs.append(
                kernels.paged_prefill_attention(  # one query per row: decode
                    q[:bd],
                    k_bits,
                    v_bits,
                    batch.decode_lengths,
                    batch.decode_page_table,
                    **options,
                )[:, 0]
            )
        if bp:
            s = (n - bd) // bp
            out = kernels.paged_prefill_attention(
                q[bd:].reshape(bp, s, self.num_heads, self.head_dim),
                k_bits,
                v_bits,
                batch.prefill_lengths,
                batch.prefill_page_table,
                **options,
            )
            outs.append(out.reshape(bp * s, self.num_heads, self.head_dim))
        out = jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
        pools = (from_bits(k_bits, dtype), from_bits(v_bits, dtype))
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim)), pools


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: CapibaraConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(d, f, config=config, rngs=rngs)
        self.up_proj = Linear(d, f, config=config, rngs=rngs)
        self.down_proj = Linear(f, d, config=config, rngs=rngs)

    def __call__(self, x):  # [..., d] -> [..., d]
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
