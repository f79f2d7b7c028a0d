"""Drop-ins for ``jax.nn.dot_product_attention`` and Flax's ``attention_fn``, on our kernels.

    out = capibara.kernels.dot_product_attention(q, k, v, is_causal=True)    # jax.nn's call
    mha = nnx.MultiHeadAttention(..., attention_fn=capibara.kernels.nnx_attention_fn)

``dot_product_attention`` has ``jax.nn.dot_product_attention``'s signature, shapes
(``BTNH`` or unbatched ``TNH``), dtype rules and semantics (JAX 0.10.2), and runs
``capibara.kernels.flash_attention`` wherever that is exact:

==============================  =====================================================
jax.nn argument                 how it reaches the kernel
==============================  =====================================================
``is_causal``                   ``causal=True, alignment="top_left"``: query ``i`` sees
                                keys ``j <= i`` also when ``T != S`` (fully masked
                                tiles still skipped)
``local_window_size=(l, r)``    the kernels' window ``i - l <= j <= i + r`` (an int
                                ``w`` is ``(w, w)``), top-left aligned, tiles skipped
``query_seq_lengths``           query segment ids (rows past the length see nothing:
                                zeros, as jax.nn)
``key_value_seq_lengths``       key segment ids
``mask`` ``[B|1, 1, 1, S|1]``   key-padding / per-batch masks: segment ids
``mask`` ``[B|1, 1, T, 1]``     query masks: segment ids
``scale``                       static or traced (folded into ``q`` when traced)
``return_residual``             the kernels' log-sum-exp, ``[B, T, N]`` in
                                ``key.dtype`` (``stop_gradient``, as jax.nn)
``bias`` (any shape), ``mask``  **fallback**: the whole call runs jax.nn's own xla
with a head dim or both T, S    path (``jax.nn.dot_product_attention(...,
                                implementation="xla")``): the kernels take neither a
                                dense mask nor a bias; same results by construction.
                                f16: a copy of that path's math (jax.nn's f16 dot
                                fails under ``jit`` on CPU in JAX 0.10.2)
==============================  =====================================================

Rows jax.nn fills with its large negative (-0.7·f32 max) everywhere -- rows that see
no key because of ``mask``/``key_value_seq_lengths``/a window, while inside
``query_seq_lengths`` -- get jax.nn's result exactly: a uniform softmax over all ``S``
keys, i.e. the mean of ``v`` (the kernels return zeros there; that is patched from the
kernels' ``lse = -inf``), residual -0.7·f32 max. One documented difference: a row
whose every logit is ``-inf`` from ``bias`` is NaN in jax.nn (fallback path: NaN here
too).

``implementation``: ``None`` (our best per platform: Pallas on TPU, our xla path
elsewhere), ``"xla"`` (our xla path), ``"pallas"``, ``"reference"`` (ours), and
``"cudnn"`` (jax.nn's cuDNN kernel: on a CUDA backend only, a ``ValueError`` elsewhere).
Keyword-only extras after jax.nn's arguments: ``interpret`` and ``block_sizes`` (as
``flash_attention``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from capibara.kernels.flash_attention import BlockSizes, _args, flash_attention

__all__ = ["dot_product_attention", "nnx_attention_fn"]

IMPLEMENTATIONS = (None, "xla", "cudnn", "pallas", "reference")


def _large_negative() -> float:
    """jax.nn's masked logit in f32 (its ``_get_large_negative`` for f32 logits)."""
    return float(np.float32(-0.7 * np.finfo(np.float32).max))


def _ensure_4d(name: str, x):
    """jax.nn's rank rule: prepend unit dims up to 4 (``None`` passes through)."""
    if x is None:
        return None
    x = _args.as_array(name, x)
    if x.ndim > 4:
        raise ValueError(f"{name} must have at most 4 dims, got {name}.shape={x.shape}")
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _check_broadcast(name: str, x, full: tuple[int, int, int, int]) -> None:
    if x is not None and any(a not in (1, f) for a, f in zip(x.shape, full, strict=True)):
        raise ValueError(
            f"{name} must be broadcastable to (B, N, T, S)={full}, got {name}.shape={x.shape}"
        )


def _check_lengths(name: str, x, b: int):
    if x is None:
        return None
    x = _args.as_array(name, x)
    if x.shape != (b,) or x.dtype != jnp.int32:
        raise ValueError(
            f"{name} must be int32 of shape (B,)={(b,)}, got {name}.shape={x.shape}, "
            f"{name}.dtype={x.dtype}"
        )
    return x


def _through_kernel(bias, mask) -> bool:
    """Whether ``mask`` (4-D) is a key-padding/query mask the segment ids express."""
    if bias is not None:
        return False
    return mask is None or (mask.shape[1] == 1 and (mask.shape[2] == 1 or mask.shape[3] == 1))


def _valid_rows(mask, lengths, b: int, n: int, axis: int):
    """``[B, n]`` bool: positions inside ``lengths`` and not masked by a 1-D ``mask``."""
    ok = jnp.ones((b, n), bool)
    if lengths is not None:
        ok = ok & (jnp.arange(n, dtype=jnp.int32)[None, :] < lengths[:, None])
    if mask is not None:
        # mask [B|1, 1, T|1, S|1] with the other axis of size 1: squeeze it out.
        m = mask[:, 0, :, 0] if axis == 2 else mask[:, 0, 0, :]
        ok = ok & jnp.broadcast_to(m, (b, n))
    return ok


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | jax.Array | None = None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    return_residual: bool = False,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
):
    """``jax.nn.dot_product_attention`` on ``capibara.kernels.flash_attention``.

    Args:
      query: ``[B, T, N, H]`` or ``[T, N, H]``.
      key: ``[B, S, K, H]`` or ``[S, K, H]``, ``N % K == 0``.
      value: same shape and dtype as ``key``.
      bias: optional additive logits bias broadcastable to ``[B, N, T, S]`` (runs
        jax.nn's xla path; see the module docstring).
      mask: optional bool mask broadcastable to ``[B, N, T, S]``, ``True`` = attend.
      scale: logit scale, ``None`` = ``1 / sqrt(H)``; static or traced.
      is_causal: query ``i`` sees keys ``j <= i`` (top-left, also when ``T != S``).
      query_seq_lengths, key_value_seq_lengths: int32 ``[B]``.
      local_window_size: ``(left, right)``: query ``i`` sees ``i - left <= j <= i + right``;
        an int ``w`` is ``(w, w)``.
      implementation: ``None``, ``"xla"``, ``"pallas"``, ``"reference"`` (ours) or
        ``"cudnn"`` (jax.nn's, CUDA only).
      return_residual: also return the log-sum-exp ``[B, T, N]`` (``[T, N]``) in
        ``key.dtype``, jax.nn's layout.
      interpret: run the Pallas kernels in the TPU interpreter (``"pallas"``/``None``).
      block_sizes: ``flash_attention``'s ``BlockSizes``.

    Returns:
      ``[B, T, N, H]`` (``query``'s shape) in ``value.dtype``; with ``return_residual``,
      ``(out, residual)``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not one of "
            + ", ".join(repr(i) for i in IMPLEMENTATIONS)
        )
    is_causal = _args.as_bool("is_causal", is_causal)
    return_residual = _args.as_bool("return_residual", return_residual)
    window = _args.window("local_window_size", local_window_size)
    output_shape = _args.as_array("query", query).shape
    if len(output_shape) not in (3, 4):
        raise ValueError(f"query must be [B, T, N, H] or [T, N, H], got query.shape={output_shape}")
    q, k, v = (_ensure_4d(n, x) for n, x in (("query", query), ("key", key), ("value", value)))
    if not q.ndim == k.ndim == v.ndim or len(output_shape) != len(jnp.shape(key)):
        raise ValueError(
            f"query, key, value must have the same rank, got query.shape={output_shape}, "
            f"key.shape={jnp.shape(key)}, value.shape={jnp.shape(value)}"
        )
    b, s, kh, h = k.shape
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(
            f"value must match key's shape and dtype, got {v.shape=} {v.dtype}, "
            f"{k.shape=} {k.dtype}"
        )
    if q.shape[0] != b or q.shape[3] != h or q.dtype != k.dtype:
        raise ValueError(
            f"query must be [B, T, N, H] with key's B, H and dtype, got {q.shape=} {q.dtype}, "
            f"{k.shape=} {k.dtype}"
        )
    t, n = q.shape[1], q.shape[2]
    if n % kh:
        raise ValueError(f"query heads must be a multiple of key/value heads, got N={n}, K={kh}")
    bias = _ensure_4d("bias", bias)
    mask = _ensure_4d("mask", mask)
    _check_broadcast("bias", bias, (b, n, t, s))
    _check_broadcast("mask", mask, (b, n, t, s))
    if mask is not None and mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be bool (True = attend), got mask.dtype={mask.dtype}")
    q_lens = _check_lengths("query_seq_lengths", query_seq_lengths, b)
    kv_lens = _check_lengths("key_value_seq_lengths", key_value_seq_lengths, b)
    scale = 1.0 / math.sqrt(h) if scale is None else _args.scale(scale)

    if implementation == "cudnn" or not _through_kernel(bias, mask):
        if implementation == "cudnn" and jax.default_backend() != "gpu":
            raise ValueError(
                "implementation='cudnn' is jax.nn's cuDNN kernel and needs a CUDA GPU; this "
                f"backend is {jax.default_backend()!r}: use None, 'xla', 'pallas' or 'reference'"
            )
        out, res = _jax_nn(
            q,
            k,
            v,
            bias,
            mask,
            scale=scale,
            is_causal=is_causal,
            query_seq_lengths=q_lens,
            key_value_seq_lengths=kv_lens,
            local_window_size=window,
            implementation="cudnn" if implementation == "cudnn" else "xla",
            return_residual=return_residual,
        )
    else:
        out, res = _kernel_attention(
            q,
            k,
            v,
            mask,
            q_lens,
            kv_lens,
            is_causal,
            window,
            scale,
            implementation,
            interpret,
            block_sizes,
        )
    out = out.reshape(output_shape)
    if return_residual:
        return out, res.reshape(output_shape[:-1])
    return out


def _jax_nn(q, k, v, bias, mask, *, return_residual: bool, implementation: str, **kwargs):
    """The fallback: jax.nn's own implementation; ``(out, residual or None)``."""
    if q.dtype == jnp.float16 and implementation == "xla":
        # NOTE: jax.nn (0.10.2) asks dot_general for F16_F16_F32, which XLA:CPU refuses;
        # eagerly jax.nn catches that and retries with the default precision, under jit
        # the error comes at lowering, past its try. Its math, default precision:
        return _jax_nn_xla_f16(q, k, v, bias, mask, return_residual=return_residual, **kwargs)
    result = jax.nn.dot_product_attention(
        q,
        k,
        v,
        bias,
        mask,
        return_residual=return_residual,
        implementation=implementation,
        **kwargs,
    )
    return result if return_residual else (result, None)


def _jax_nn_xla_f16(
    q,
    k,
    v,
    bias,
    mask,
    *,
    scale,
    is_causal,
    query_seq_lengths,
    key_value_seq_lengths,
    local_window_size,
    return_residual,
):
    """jax.nn's ``_dot_product_attention_xla`` step by step (f32 logits and softmax,
    probabilities in ``key.dtype``), with the default dot precision."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    qg = q.reshape(b, t, kh, g, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, n, t, s) * jnp.asarray(scale, jnp.float32)
    if bias is not None:
        logits = (logits + bias).astype(jnp.float32)
    q_pos = jnp.arange(t)[:, None]
    k_pos = jnp.arange(s)[None, :]
    keep = jnp.ones((1, 1, t, s), bool)
    if mask is not None:
        keep = keep & mask
    if is_causal:
        keep = keep & (k_pos <= q_pos)
    if local_window_size is not None:
        left, right = local_window_size
        keep = keep & (q_pos <= k_pos + left) & (q_pos >= k_pos - right)
    if query_seq_lengths is not None:
        keep = keep & (q_pos < query_seq_lengths[:, None, None, None])
    if key_value_seq_lengths is not None:
        keep = keep & (k_pos < key_value_seq_lengths[:, None, None, None])
    logits = jnp.where(keep, logits, _large_negative())
    probs = jax.nn.softmax(logits, axis=-1).astype(k.dtype).reshape(b, kh, g, t, s)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
    if query_seq_lengths is not None:
        out = out * (jnp.arange(t)[None, :] < query_seq_lengths[:, None])[..., None, None]
    if not return_residual:
        return out, None
    res = jax.nn.logsumexp(logits, axis=-1).astype(k.dtype).transpose(0, 2, 1)
    return out, jax.lax.stop_gradient(res)


def _kernel_attention(
    q,
    k,
    v,
    mask,
    q_lens,
    kv_lens,
    is_causal,
    window,
    scale,
    implementation,
    interpret,
    block_sizes,
):
    """The kernel path: ``(out [B, T, N, H], residual [B, T, N] in key.dtype)``."""
    b, t, n, _ = q.shape
    s, kh = k.shape[1], k.shape[2]
    q_mask = mask if mask is not None and mask.shape[3] == 1 else None
    kv_mask = mask if mask is not None and mask.shape[3] != 1 else None
    segment_ids = None
    if q_mask is not None or kv_mask is not None or q_lens is not None or kv_lens is not None:
        q_ok = _valid_rows(q_mask, q_lens, b, t, axis=2)
        kv_ok = _valid_rows(kv_mask, kv_lens, b, s, axis=3)
        # Equal ids attend: valid queries (0) see valid keys (0); 1 and 2 see nothing.
        segment_ids = (jnp.where(q_ok, 0, 1), jnp.where(kv_ok, 0, 2))
    out, lse = flash_attention(
        q,
        k,
        v,
        causal=is_causal,
        segment_ids=segment_ids,
        local_window_size=window,
        alignment="top_left",
        scale=scale,
        implementation=implementation,
        interpret=interpret,
        block_sizes=block_sizes,
        return_residual=True,
    )
    empty = lse == -jnp.inf  # [B, T, N]: the row saw no key
    if segment_ids is not None or window is not None:
        # jax.nn masks with a finite large negative, so a row that sees nothing is a
        # uniform softmax over all S keys (the mean of v) -- unless it lies past
        # query_seq_lengths, whose rows jax.nn zeroes.
        inside = jnp.ones((b, t), bool)
        if q_lens is not None:
            inside = jnp.arange(t, dtype=jnp.int32)[None, :] < q_lens[:, None]
        mean = jnp.mean(v.astype(jnp.float32), axis=1)  # [B, K, H]
        mean = jnp.repeat(mean, n // kh, axis=1).astype(out.dtype)  # [B, N, H]
        uniform = empty & inside[:, :, None]
        out = jnp.where(uniform[..., None], mean[:, None], out)
    res = jnp.where(empty, _large_negative(), lse).astype(k.dtype)
    return out, jax.lax.stop_gradient(res)


def nnx_attention_fn(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    promote_dtype=None,
    is_causal: bool = False,
    *,
    implementation: str | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
):
    """``flax.nnx.dot_product_attention``'s signature, on ``dot_product_attention``.

    For ``nnx.MultiHeadAttention(..., attention_fn=nnx_attention_fn)`` (or
    ``functools.partial(nnx_attention_fn, implementation=...)``). Shapes
    ``[batch..., L, heads, depth]``; ``mask`` broadcastable to
    ``[batch..., heads, q_len, kv_len]`` (any dtype, ``!= 0`` = attend). As Flax's own
    fast path (which calls ``jax.nn.dot_product_attention``), ``precision`` is ignored.
    With active dropout (``dropout_rate > 0`` and not ``deterministic``) or a ``module``
    to sow the weights into, it calls ``nnx.dot_product_attention`` itself: those need the
    materialized weights. ``promote_dtype=None`` is Flax's default
    (``flax.nnx.nn.dtypes.promote_dtype``; Flax is imported only when this function
    runs, so ``import capibara.kernels`` stays free of it). A causal
    ``nnx.make_causal_mask`` mask is a dense ``[B, 1, T, T]`` mask and so runs jax.nn's
    xla path (see the module docstring); call the module with ``is_causal=True`` instead
    to run the kernels.
    """
    from flax import nnx
    from flax.nnx.nn import dtypes as nnx_dtypes

    if promote_dtype is None:
        promote_dtype = nnx_dtypes.promote_dtype
    if module is not None or (dropout_rate > 0.0 and not deterministic):
        return nnx.dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            broadcast_dropout,
            dropout_rng,
            dropout_rate,
            deterministic,
            dtype,
            precision,
            module,
            promote_dtype,
            is_causal,
        )
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
    shape = query.shape
    if not query.ndim == key.ndim == value.ndim:
        raise ValueError(
            f"q, k, v must have the same rank, got {query.shape=}, {key.shape=}, {value.shape=}"
        )
    if query.ndim > 4:
        # Flax's rule: several batch dims become one (mask/bias must carry all of them).
        def to_4d(x):
            return None if x is None else jnp.reshape(x, (math.prod(x.shape[:-3]), *x.shape[-3:]))

        query, key, value, bias, mask = map(to_4d, (query, key, value, bias, mask))
    if mask is not None:
        mask = jnp.asarray(mask).astype(jnp.bool_)
    out = dot_product_attention(
        query,
        key,
        value,
        bias,
        mask,
        is_causal=is_causal,
        implementation=implementation,
        interpret=interpret,
        block_sizes=block_sizes,
    )
    return out.reshape(shape)
