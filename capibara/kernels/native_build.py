"""Builds the package's native CPU kernels (C++ XLA FFI handlers) on first use.

A kernel source is compiled on the machine that runs it, with the C++ compiler found
on ``PATH`` (``g++`` / ``c++`` / ``clang++``) and ``-march=native``, against the
jaxlib FFI headers; the shared library is cached under ``$XDG_CACHE_HOME/capibara``
(default ``~/.cache/capibara``), keyed by the source and the package headers it
includes (``#include "..."``, e.g. ``capibara/kernels/native/f32x16.h``), the flags, the
compiler, the jax version and the CPU's feature flags, so a cached library is only
reused where it was built for. Without a compiler, or when the build fails, ``load``
raises ``Unavailable`` with the reason, and the ops fall back to XLA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import jax

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
COMPILERS = ("g++", "c++", "clang++")

_lock = threading.Lock()


class Unavailable(Exception):
    """The native kernel cannot be built or loaded here (the message says why)."""


@functools.cache
def load(source: Path) -> ctypes.CDLL:
    """The shared library of ``source``, built (or found in the cache) and loaded once."""
    with _lock:
        return ctypes.cdll.LoadLibrary(str(build(source)))


def register(
    source: Path,
    target: str,
    symbol: str,
    check: Callable[[ctypes.CDLL], str | None] | None = None,
) -> str | None:
    """Builds ``source`` and registers its FFI handler ``symbol`` as the XLA:CPU custom
    call ``target``. Returns None when the kernel can run here, else why not (the
    build failed, or ``check(library)`` — e.g. an instruction-set test — said so)."""
    try:
        library = load(source)
    except Unavailable as e:
        return str(e)
    if check is not None and (why := check(library)) is not None:
        return why
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return None


class Kernel:
    """One native kernel's FFI handler, built and registered on first use (``register``).

    kernel = Kernel(source, "capibara_op", "CapibaraOp")
    kernel.available()  # True when it runs here
    kernel.reason()     # why not (None when it runs); computed once
    """

    def __init__(
        self,
        source: Path,
        target: str,
        symbol: str,
        check: Callable[[ctypes.CDLL], str | None] | None = None,
    ):
        self.source, self.target, self.symbol, self.check = source, target, symbol, check
        self._lock = threading.Lock()
        self._registered = False
        self._why_not: str | None = None

    def reason(self) -> str | None:
        """Why the native kernel cannot run on this machine (None when it can)."""
        with self._lock:
            if not self._registered:
                self._why_not = register(self.source, self.target, self.symbol, self.check)
                self._registered = True
            return self._why_not

    def available(self) -> bool:
        """True when the kernel is built, loaded and registered for XLA:CPU here."""
        return self.reason() is None


def build(source: Path) -> Path:
    """Compiles ``source`` into the cache unless an identical build is there; its path."""
    compiler = next(filter(None, map(shutil.which, COMPILERS)), None)
    if compiler is None:
        raise Unavailable(f"no C++ compiler on PATH (looked for {', '.join(COMPILERS)})")
    flags = [*FLAGS, "-isystem", jax.ffi.include_dir()]
    key = hashlib.sha256()
    sources = [source.read_bytes(), *(h.read_bytes() for h in local_headers(source))]
    for part in (*sources, " ".join(flags).encode(), _compiler_version(compiler)):
        key.update(part)
    key.update(jax.__version__.encode() + _cpu_flags())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "capibara"
    library = cache / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes (pytest-xdist, CI
    # jobs sharing a cache) never load a half-written library.
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / library.name
        result = subprocess.run(
            [compiler, *flags, str(source), "-o", str(out)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise Unavailable(f"{compiler} failed on {source.name}:\n{result.stderr[-2000:]}")
        os.replace(out, library)
    return library


def local_headers(source: Path) -> list[Path]:
    """The files ``source`` includes with ``#include "..."`` (relative to the including
    file), recursively, in a fixed order: they are part of a build's cache key."""
    found: list[Path] = []
    pending = [source]
    while pending:
        current = pending.pop()
        for match in _LOCAL_INCLUDE.finditer(current.read_text()):
            header = (current.parent / match.group(1)).resolve()
            if header.exists() and header not in found:
                found.append(header)
                pending.append(header)
    return found


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def _compiler_version(compiler: str) -> bytes:
    return subprocess.run([compiler, "--version"], capture_output=True).stdout


def _cpu_flags() -> bytes:
    """The CPU's feature list (a -march=native build is reused only where it matches)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return platform.processor().encode()
