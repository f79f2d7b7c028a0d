"""Capibara: a Flax NNX model layer over the Pallas kernels of ``kernels``.

from capibara.core import CapibaraModel, CapibaraConfig, ConfigurationManager
capibara.sparsify(model, sparsity=0.6562, block_shape=(128, 128), targets=("mlp",))
"""

from capibara.sharding import make_mesh, shard
from capibara.sparsity import SparsifyReport, sparsify

__all__ = ["SparsifyReport", "make_mesh", "shard", "sparsify"]
