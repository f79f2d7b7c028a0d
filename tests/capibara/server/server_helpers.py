"""A real ``capibara serve`` process per test module, on 127.0.0.1 and a free port.

``start_server`` runs the installed command (or ``python -m capibara.cli``) with the
random-weight tiny model and small engine sizes, waits for ``/health`` and returns a
``Server``; the module fixture stops it. ``SERVE_ARGS`` is what both the servers and
the in-process reference engine of the tests are built from, so greedy text can be
compared exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import socket
import subprocess
import sys
import time

import httpx

REPO = pathlib.Path(__file__).resolve().parents[3]
_SCRIPT = pathlib.Path(sys.executable).with_name("capibara")
ENTRY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "capibara.cli"]

API_KEY = "test-key"
FAULT = "@@fault@@"  # prompts containing it fail inside the engine (CAPIBARA_SERVE_FAULT_PROMPT)
MAX_SEQ_LEN = 128
# Small sizes: 3 step shapes to compile (decode + prefill buckets 16, 32).
SERVE_ARGS = [
    "--preset", "tiny", "--seed", "0", "--slots", "8", "--page-size", "8",
    "--prefill-chunk", "32", "--max-seq-len", str(MAX_SEQ_LEN),
]  # fmt: skip


def _random_tiny() -> list[str]:
    """``--random-tiny`` where the CLI has it (its default model is then the real one);
    before it, no ``--checkpoint`` already meant the random tiny model."""
    from capibara import cli

    [serve] = [
        a.choices["serve"]
        for a in cli._parser()._actions
        if isinstance(a, argparse._SubParsersAction)
    ]
    flags = {flag for action in serve._actions for flag in action.option_strings}
    return ["--random-tiny"] if "--random-tiny" in flags else []


SERVE_ARGS += _random_tiny()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Server:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log: pathlib.Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def metrics_text(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(tmp_dir: pathlib.Path, *extra: str, env: dict | None = None) -> Server:
    port = _free_port()
    log = tmp_dir / "server.log"
    argv = [*ENTRY, "serve", *SERVE_ARGS, "--port", str(port), *extra]
    environ = {**os.environ, **(env or {})}
    with log.open("w") as out:
        process = subprocess.Popen(
            argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=environ
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"capibara serve exited {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"capibara serve did not start in 180 s:\n{log.read_text()}")


def reference_engine():
    """The engine ``capibara serve SERVE_ARGS`` builds, in this process."""
    from capibara import cli

    args = cli._parser().parse_args(["serve", *SERVE_ARGS])
    return cli._engine(args, args.max_seq_len)
