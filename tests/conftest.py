"""Fixtures shared by every test directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# XLA:CPU at optimisation level 0: the suite is mostly compiling small interpret-mode
# programs, and LLVM's passes were a quarter of its time (a clean clone's suite went
# from 1031 s to ~790 s on 2 cores). Results are the same programs' results; only
# their machine code is less optimised. Set before anything imports jax, and passed on
# to the subprocesses the tests start (``xla_flags``).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()


def xla_flags(devices: int | None = None) -> str:
    """``XLA_FLAGS`` for a subprocess: the suite's flags, and ``devices`` host devices."""
    if devices is None:
        return os.environ["XLA_FLAGS"]
    return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"


def _run_on_host_devices(args: list[str], devices: int, timeout: float) -> dict:
    """Runs ``python *args`` with ``devices`` simulated CPU devices and returns the JSON
    of its ``RESULT{...}`` line.

    XLA fixes the host device count when it starts, so multi-device checks run in a
    subprocess; the timeout turns a hung collective into a failure.
    """
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices)}
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
