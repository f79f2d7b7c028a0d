"""Every test here converts into a fresh cache (``CAPIBARA_CACHE_DIR``), never ``~/.cache``."""

from __future__ import annotations

import pathlib
import shutil
import tempfile

import pytest


@pytest.fixture(scope="session", autouse=True)
def capibara_cache():
    # Our own temporary directory, not tmp_path_factory's: pytest deletes all but the
    # newest three base temp dirs, so a concurrent pytest run could empty this cache
    # while this session still reads it.
    path = tempfile.mkdtemp(prefix="capibara-cache-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPIBARA_CACHE_DIR", path)
        yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)
