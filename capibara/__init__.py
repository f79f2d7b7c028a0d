"""Capibara: Pallas kernels (``capibara.kernels``) under a Flax NNX model and engine.

    import capibara.kernels            # the ops only: jax, no Flax, no model
    from capibara.core import CapibaraModel, CapibaraConfig, ConfigurationManager
    capibara.sparsify(model, sparsity=0.6562, block_shape=(128, 128), targets=("mlp",))
    capibara.quantize(model, bits=4, group=32)  # int4 linears through quantized_matmul

The names below load their modules on first access (PEP 562), so that
``import capibara.kernels`` — the drop-in backend — never pays for Flax, the model or
the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_LAZY: dict[str, str] = {
    "QuantizeReport": "capibara.quantization",
    "quantize": "capibara.quantization",
    "SparsifyReport": "capibara.sparsity",
    "sparsify": "capibara.sparsity",
    "make_mesh": "capibara.sharding",
    "shard": "capibara.sharding",
}

__all__ = ["QuantizeReport", "SparsifyReport", "make_mesh", "quantize", "shard", "sparsify"]

if TYPE_CHECKING:
    from capibara.quantization import QuantizeReport, quantize
    from capibara.sharding import make_mesh, shard
    from capibara.sparsity import SparsifyReport, sparsify


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'capibara' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
