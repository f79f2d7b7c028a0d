"""Capibara kernels: Pallas TPU kernels with XLA and reference implementations.

Every op takes ``implementation=None | "pallas" | "xla" | "reference"``,
``interpret=False`` and ``block_sizes=None``; see ``capibara/kernels/_platform.py`` for which
implementation runs where.
"""

from capibara.kernels import moe
from capibara.kernels.attention_compat import dot_product_attention, nnx_attention_fn
from capibara.kernels.block_sparse import BlockSparseMatrix, block_sparse_matmul
from capibara.kernels.decode_matmul import decode_matmul
from capibara.kernels.flash_attention import flash_attention
from capibara.kernels.grouped_matmul import grouped_matmul, transposed_grouped_matmul
from capibara.kernels.grouped_matmul.ragged_dot import ragged_dot
from capibara.kernels.paged_attention import paged_attention, paged_prefill_attention
from capibara.kernels.quantized_matmul import QuantizedWeight, quantize, quantized_matmul
from capibara.kernels.rope_kv_write import rope_kv_write

__all__ = [
    "BlockSparseMatrix",
    "QuantizedWeight",
    "block_sparse_matmul",
    "decode_matmul",
    "dot_product_attention",
    "flash_attention",
    "grouped_matmul",
    "moe",
    "nnx_attention_fn",
    "paged_attention",
    "paged_prefill_attention",
    "quantize",
    "quantized_matmul",
    "ragged_dot",
    "rope_kv_write",
    "transposed_grouped_matmul",
]
