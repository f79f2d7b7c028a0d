"""Fixtures shared by every test directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# XLA:CPU at optimisation level 0: the suite is mostly compiling small interpret-mode
# programs, and LLVM's passes were a quarter of its time (the suite went from 1031 s
# to 749 s of pytest on 2 cores, with --dist loadfile and the strict-config merge).
# Results are the same programs' results; only their machine code is less optimised.
# Set before anything imports jax; subprocesses inherit it (``_host_device_env``).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()


def _host_device_env(devices: int) -> dict[str, str]:
    """This process's environment for a subprocess with ``devices`` simulated CPU
    devices: the count appended to the suite's ``XLA_FLAGS``, which are kept."""
    count = f"--xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} {count}"}


@pytest.fixture(scope="session")
def host_device_env():
    """``env(devices) -> dict``: see ``_host_device_env``."""
    return _host_device_env


def _run_on_host_devices(args: list[str], devices: int, timeout: float) -> dict:
    """Runs ``python *args`` with ``devices`` simulated CPU devices and returns the JSON
    of its ``RESULT{...}`` line.

    XLA fixes the host device count when it starts, so multi-device checks run in a
    subprocess; the timeout turns a hung collective into a failure.
    """
    proc = subprocess.run(
        [sys.executable, *args],
        env=_host_device_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.fixture(scope="session")
def run_on_host_devices():
    """``run(args, devices, timeout) -> dict``: see ``_run_on_host_devices``."""
    return _run_on_host_devices
