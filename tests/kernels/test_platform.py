"""The platform table: implementation=None picks per platform at lowering time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara.kernels import _platform, block_sparse_matmul
from capibara.kernels.block_sparse import BlockSparseMatrix


@pytest.fixture
def w():
    return BlockSparseMatrix.prune(np.ones((256, 256), np.float32), 0.5, (128, 128))


def test_default_exports_the_pallas_kernel_for_tpu_from_a_cpu_host(w):
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
    exported = jax.export.export(jax.jit(block_sparse_matmul), platforms=["tpu"])(x, w)
    assert "tpu_custom_call" in exported.mlir_module()


def test_default_runs_xla_on_cpu(w):
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
    text = jax.jit(block_sparse_matmul).lower(x, w).as_text()
    assert "tpu_custom_call" not in text and "dot_general" in text


def test_table_covers_every_platform_with_a_runnable_choice():
    for platform, best in _platform.BEST_IMPLEMENTATION.items():
        assert best in _platform.RUNNABLE[platform]
