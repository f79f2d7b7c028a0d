"""Every op inside a sharded ``jit`` on 8 simulated CPU devices (``capibara.kernels._mesh``).

The cases live in ``mesh_cases.py`` and run in one subprocess: XLA fixes the host
device count at start-up, and a kernel that XLA tried to partition itself would hang
on a rendezvous, so the timeout turns a hang into a failure.
"""

from __future__ import annotations

import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).with_name("mesh_cases.py")
TOLERANCE = 2e-5  # f32, relative to the largest reference value


@pytest.fixture(scope="module")
def results(run_on_host_devices):
    return run_on_host_devices([str(SCRIPT)], devices=8, timeout=420)


def numeric(results):
    return {k: v for k, v in results.items() if isinstance(v, float)}


def test_every_op_matches_the_single_device_reference(results):
    errors = numeric(results)
    assert len(errors) >= 45, sorted(errors)  # every case ran
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    assert not bad, bad


def test_outputs_stay_split(results):
    assert results["flash hkv=2 interpret out spec"] == "P('data', None, 'model')"
    assert results["gmm interpret out spec"] == "P(None, 'model')"
    assert results["tgmm xla out spec"] == "P('expert', None, 'model')"
    assert results["rope_kv_write pool spec"] == "P('model',)"
    for shards in (4, 8):
        spec = results[f"block_sparse columns/{shards} xla out spec"]
        assert spec == "P('data', None, 'model')", spec


def test_a_layout_that_cannot_split_warns_and_stays_correct(results):
    assert results["flash 6/3 heads on 4 shards warned"] is True
    assert results["flash 6/3 heads on 4 shards fwd"] <= TOLERANCE


def test_the_default_implementation_exports_for_tpu_on_the_mesh(results):
    for op in ("flash_attention", "grouped_matmul"):
        assert results[f"tpu export {op}"] == "1 mosaic calls, 8 devices"
