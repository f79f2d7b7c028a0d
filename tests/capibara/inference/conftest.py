"""Fixtures of the engine tests (helpers live in ``engine_helpers``)."""

from __future__ import annotations

import pytest
from flax import nnx

from capibara.core.config import preset
from capibara.core.model import CapibaraModel


@pytest.fixture(scope="session")
def tiny_model():
    return CapibaraModel(preset("tiny", implementation="xla"), rngs=nnx.Rngs(0))
