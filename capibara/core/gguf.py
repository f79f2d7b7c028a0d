"""GGUF files (llama.cpp's format) in: config, tensors under Hugging Face names, tokenizer.

A GGUF file holds metadata (``general.architecture``, ``llama.block_count``, the
tokenizer's vocabulary, merges and chat template) and tensors named the llama.cpp way
(``blk.3.attn_q.weight``), many of them block-quantized. This module translates both
into what ``capibara.core.checkpoint`` already reads from a Hugging Face directory:

    metadata -> a Hugging Face ``config.json`` dict -> ConfigurationManager.from_hf_config
    tensors  -> {"model.layers.3.self_attn.q_proj.weight": f32 [out, in], ...}
                (dequantized one at a time, on access: see ``GGUFFile.tensors``)

so the mapping onto our parameters (transposes, tied embeddings) has one definition,
``checkpoint._entry``. Dequantization is the ``gguf`` package's own (numpy).

NOTE: llama.cpp's converter permutes the rows of q/k projections of ``llama``-arch
models (its rotary pairs ``(2i, 2i+1)``, Hugging Face's ``(i, i + D/2)``); ``_unpermute``
undoes it. Qwen2 files are written unpermuted.
"""

from __future__ import annotations

import pathlib
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

# Architectures whose tensors and metadata we translate, and the Hugging Face
# model_type each becomes. llama.cpp writes Mistral (dense) models as "llama".
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# Quantization types dequantized through ``gguf.quants`` (numpy); others are refused.
SUPPORTED_QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
SUPPORTED_QUANTS += ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``.

    Raises:
      ValueError: for a tensor with no Hugging Face counterpart, naming it.
    """
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ValueError(
        f"unknown GGUF tensor {gguf_name!r}: not one of a dense llama/qwen2 model's "
        f"({', '.join(_TOP_NAMES)}, blk.N.{{{', '.join(_LAYER_NAMES)}}})"
    )


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation: ``[n·D, ...]`` rows ``(h, D/2, 2)`` ->
    ``(h, 2, D/2)`` (the inverse of ``convert_hf_to_gguf.LlamaModel.permute``)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _LazyTensors(Mapping):
    """``{name: array}`` computed on access; keeps only the last one.

    ``checkpoint.load_weights`` reads each tensor twice (its shape, then its value)
    and never two at once, so one cached entry keeps the peak at one tensor beyond
    the model's own weights.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], read: Callable[[str], np.ndarray]):
        self.shapes = shapes
        self._read = read
        self._last: tuple[str, np.ndarray] | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        if self._last is None or self._last[0] != name:
            if name not in self.shapes:
                raise KeyError(name)
            self._last = (name, self._read(name))
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class GGUFFile:
    """One GGUF file, memory-mapped: its metadata, config and (lazy) tensors.

    Example:
      f = GGUFFile("SmolLM2-135M-Instruct.Q4_1.gguf")
      f.architecture, f.hf_config()["num_hidden_layers"]
      w = f.tensors()["model.layers.0.self_attn.q_proj.weight"]   # f32 [out, in]

    Raises:
      ValueError: a file of another architecture, a tensor we cannot map, or a
        quantization type ``gguf`` cannot dequantize -- naming it, before any
        tensor is read.
    """

    def __init__(self, path: str | pathlib.Path):
        import gguf  # inside: only GGUF users pay for the import

        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (ValueError, IndexError, struct.error) as e:  # bad magic, truncated
            raise ValueError(f"{self.path} is not a readable GGUF file: {e}") from e
        self.architecture = self.field("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"{self.path.name}: unsupported GGUF architecture {self.architecture!r}; "
                f"supported: {sorted(ARCHITECTURES)}"
            )
        self._by_hf: dict[str, Any] = {}
        for t in self._reader.tensors:
            if t.tensor_type.name not in SUPPORTED_QUANTS:
                raise ValueError(
                    f"{self.path.name}: tensor {t.name!r} has quantization type "
                    f"{t.tensor_type.name}, which is not supported; supported: "
                    f"{', '.join(SUPPORTED_QUANTS)}"
                )
            self._by_hf[hf_name(t.name)] = t

    # -- metadata --------------------------------------------------------------------
    def field(self, key: str, default: Any = None) -> Any:
        """The metadata value of ``key`` (str, number, bool or list), or ``default``."""
        f = self._reader.fields.get(key)
        return default if f is None else f.contents()

    def _arch(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.architecture}.{key}", default)

    def hf_config(self) -> dict[str, Any]:
        """The metadata as a Hugging Face ``config.json`` dict (what the converter read)."""
        heads = self._arch("attention.head_count")
        kv_heads = self._arch("attention.head_count_kv", heads)
        for name, value in (("head_count", heads), ("head_count_kv", kv_heads)):
            if not isinstance(value, int):
                raise ValueError(
                    f"{self.path.name}: {self.architecture}.attention.{name}={value!r}; "
                    "only one head count for every layer is supported"
                )
        hidden = self._arch("embedding_length")
        scaling = self._arch("rope.scaling.type")
        if scaling not in (None, "none"):
            raise ValueError(
                f"{self.path.name}: {self.architecture}.rope.scaling.type={scaling!r} "
                "is not supported (only unscaled RoPE)"
            )
        tokens = self._reader.fields.get("tokenizer.ggml.tokens")
        vocab = self._arch("vocab_size") or (len(tokens.data) if tokens else None)
        if vocab is None:
            vocab = self._by_hf["model.embed_tokens.weight"].shape[-1]
        return {
            "model_type": ARCHITECTURES[self.architecture],
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "num_hidden_layers": self._arch("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": self._arch("attention.key_length") or hidden // heads,
            "intermediate_size": self._arch("feed_forward_length"),
            "max_position_embeddings": self._arch("context_length", 2048),
            "rope_theta": float(self._arch("rope.freq_base", 10000.0)),
            "rms_norm_eps": float(self._arch("attention.layer_norm_rms_epsilon", 1e-6)),
            # No output.weight: the head reuses the embedding (llama.cpp's convention).
            "tie_word_embeddings": "lm_head.weight" not in self._by_hf,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._by_hf,
            "torch_dtype": "float32",  # tensors are dequantized to f32
        }

    # -- tensors ---------------------------------------------------------------------
    def tensor_types(self) -> dict[str, str]:
        """``{hf_name: quantization type name}`` (e.g. ``"Q4_1"``), in file order."""
        return {name: t.tensor_type.name for name, t in self._by_hf.items()}

    def _shape(self, t) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(t.shape))  # ggml lists dims fastest-first

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` (Hugging Face name, layout ``[out, in]``) dequantized to f32."""
        from gguf.quants import dequantize

        t = self._by_hf[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(self._shape(t))
        if self.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            key = "head_count" if ".q_proj." in name else "head_count_kv"
            heads = self._arch(f"attention.{key}") or self._arch("attention.head_count")
            w = _unpermute(w, heads)
        return np.ascontiguousarray(w)

    def tensors(self) -> Mapping[str, np.ndarray]:
        """``{hf_name: f32 array}``, each dequantized when read (see ``_LazyTensors``)."""
        return _LazyTensors({n: self._shape(t) for n, t in self._by_hf.items()}, self.read)
