"""Two real ``jax.distributed`` processes on 127.0.0.1 (gloo, 4 CPU devices each) run the
``tiny-moe`` forward and a training step on one (2, 4) mesh and get one process's numbers.

The workers (``multiprocess_worker.py``) write to files, not pipes: a worker blocked on
a full pipe would never reach the job's shutdown barrier. Both are killed if either
fails or the time runs out.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory, host_device_env):
    out = tmp_path_factory.mktemp("multiprocess")
    env = host_device_env(4)
    port = free_port()
    with contextlib.ExitStack() as files:
        procs = [
            subprocess.Popen(
                [sys.executable, str(WORKER), str(i), str(port), str(out)],
                env=env,
                stdout=files.enter_context(open(out / f"out{i}", "w")),
                stderr=files.enter_context(open(out / f"err{i}", "w")),
            )
            for i in range(2)
        ]
        try:
            codes = [p.wait(timeout=240) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for i, code in enumerate(codes):
        assert code == 0, (out / f"err{i}").read_text()[-3000:]
    found = []
    for i in range(2):
        line = next(s for s in (out / f"out{i}").read_text().splitlines() if s.startswith("RESULT"))
        found.append(json.loads(line[len("RESULT") :]))
    return found, out


def test_two_processes_share_one_mesh(results):
    for r in results[0]:
        assert r["global_devices"] == 8 and r["local_devices"] == 4
        assert r["mesh_devices_of_other_processes"] == 4


def test_forward_and_training_step_equal_one_process(results):
    found, out = results
    single = np.load(out / "single.npz")  # process 0's first device alone
    loss_single = found[0]["loss_single"]
    for i, r in enumerate(found):
        mesh = np.load(out / f"mesh{i}.npz")  # what process i gathered from the mesh
        assert np.max(np.abs(mesh["logits"] - single["logits"])) <= 1e-5
        assert abs(r["loss"] - loss_single) <= 1e-5 * abs(loss_single)
        assert np.max(np.abs(mesh["after"] - single["after"])) <= 1e-4
    # The step really moved the weights.
    assert np.max(np.abs(single["after"] - single["logits"])) > 1e-3
