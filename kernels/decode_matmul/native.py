"""Builds, loads and calls the native CPU kernel (``decode_matmul.cc``, XLA FFI).

The kernel is compiled on first use, on the machine that runs it, with the C++
compiler found on ``PATH`` (``g++`` / ``c++`` / ``clang++``) and ``-march=native``;
the shared library is cached under ``$XDG_CACHE_HOME/capibara`` (default
``~/.cache/capibara``), keyed by the source, the flags, the compiler, the jaxlib
headers and the CPU's feature flags. It runs only where the compiler targets
AVX512-BF16 (``vdpbf16ps``); without it (no compiler, another CPU) ``available()``
is False, ``reason()`` says why, and ``implementation=None`` uses XLA's dot.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

TARGET = "capibara_decode_matmul"
SOURCE = Path(__file__).with_name("decode_matmul.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
COMPILERS = ("g++", "c++", "clang++")

_lock = threading.Lock()


class _Unavailable(Exception):
    pass


def available() -> bool:
    """True when the kernel is built, loaded and registered for XLA:CPU here."""
    return _load() is None


def reason() -> str | None:
    """Why the native kernel cannot run on this machine (None when it can)."""
    return _load()


@functools.cache
def _load() -> str | None:
    with _lock:
        try:
            library = ctypes.cdll.LoadLibrary(str(_build()))
        except _Unavailable as e:
            return str(e)
        if not library.CapibaraDecodeMatmulUsesDpbf16():
            return "the compiler does not target AVX512-BF16 on this CPU (-march=native)"
        jax.ffi.register_ffi_target(
            TARGET, jax.ffi.pycapsule(library.CapibaraDecodeMatmul), platform="cpu"
        )
        return None


def _build() -> Path:
    compiler = next(filter(None, map(shutil.which, COMPILERS)), None)
    if compiler is None:
        raise _Unavailable(f"no C++ compiler on PATH (looked for {', '.join(COMPILERS)})")
    include = jax.ffi.include_dir()
    flags = [*FLAGS, "-isystem", include]
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), _compiler_version(compiler)):
        key.update(part)
    key.update(jax.__version__.encode() + _cpu_flags())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "capibara"
    library = cache / f"decode_matmul-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes (pytest-xdist, CI
    # jobs sharing a cache) never load a half-written library.
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / library.name
        result = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise _Unavailable(f"{compiler} failed:\n{result.stderr[-2000:]}")
        os.replace(out, library)
    return library


def _compiler_version(compiler: str) -> bytes:
    return subprocess.run([compiler, "--version"], capture_output=True).stdout


def _cpu_flags() -> bytes:
    """The CPU's feature list: a library built with -march=native is only reused on
    a machine with the same features."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return platform.processor().encode()


def matmul(x: jax.Array, w: jax.Array, *, w_transposed: bool) -> jax.Array:
    """``x [M, K] @ w`` in f32 through the native kernel; both bf16, 2-D.

    ``w`` is ``[K, N]``, or ``[N, K]`` with ``w_transposed``. Returns f32 ``[M, N]``.
    """
    n = w.shape[0] if w_transposed else w.shape[1]
    call = jax.ffi.ffi_call(
        TARGET,
        jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
        vmap_method="sequential",
    )
    # bf16 straight in: a bitcast to uint16 would be a copy on XLA:CPU (through f32).
    return call(x, w, transposed=w_transposed)
