"""``make lower``'s sharded rows: the tiny-moe forward and training gradients, and the
llama-3-8b / mixtral-8x7b forwards from abstract inputs, export for TPU on a (4, 8)
data x model mesh and a (2, 4, 4) data x expert x model mesh of 32 CPU devices
(subprocess: XLA fixes the device count at start)."""

from __future__ import annotations

import subprocess
import sys

import jax

from capibara import mesh_lowering


def test_the_model_exports_for_tpu_on_a_4x8_mesh(host_device_env):
    proc = subprocess.run(
        [sys.executable, "-m", "capibara.mesh_lowering"],
        env=host_device_env(32),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("tiny-moe")]
    assert len(rows) == 4, proc.stdout
    big = [line for line in proc.stdout.splitlines() if line.startswith(("llama", "mixtral"))]
    assert len(big) == 3 and all("ok (" in r and " fits " in r for r in big), proc.stdout
    # Expert parallel: the MoE layers exchange tokens with ragged all-to-alls (two per
    # layer forward, their transposes backward); tensor parallel has none.
    for row in rows + big:
        assert ("ragged_all_to_all" in row) == ("expert" in row), row
    for row in rows:
        assert " 32 " in row and "ok (" in row, row
        # Parameters split: device 0 holds well under all of them.
        held, total = (
            int(x.replace(",", "")) for x in row.split("params ")[1].split(" B")[0].split(" of ")
        )
        assert held < total / 4, row


def test_too_few_devices_is_a_clear_error(capsys):
    # This process has XLA's default device count (one CPU device): no subprocess needed.
    found = jax.device_count()
    assert found < 32, "run the test suite without a forced host device count"
    assert mesh_lowering.main() == 1
    assert f"needs 32 devices, found {found}" in capsys.readouterr().out
