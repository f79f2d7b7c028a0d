"""Fixtures shared by every test directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _run_on_host_devices(args: list[str], devices: int, timeout: float) -> dict:
    """Runs ``python *args`` with ``devices`` simulated CPU devices and returns the JSON
    of its ``RESULT{...}`` line.

    XLA fixes the host device count when it starts, so multi-device checks run in a
    subprocess; the timeout turns a hung collective into a failure.
    """
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.fixture(scope="session")
def run_on_host_devices():
    """``run(args, devices, timeout) -> dict``: see ``_run_on_host_devices``."""
    return _run_on_host_devices
