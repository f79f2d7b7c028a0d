"""``greedy_tokens``: the argmax of each row, ties to the lowest index, always in range."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara.core.inference.sampling import greedy_tokens


# Vocabularies within one block of 128, a multiple of it, and a partial last block.
@pytest.mark.parametrize("vocab", [1, 50, 128, 256, 300, 1000])
def test_greedy_tokens_equal_argmax_with_ties(vocab):
    logits = np.random.default_rng(vocab).standard_normal((12, vocab)).astype(np.float32)
    top = logits.max() + 1.0
    logits[1, [min(4, vocab - 1), vocab - 1]] = top  # a tie (across blocks): the first wins
    logits[2, -1] = top  # the last index (in the partial block, if any)
    logits[3] = 0.0  # all equal
    logits[4, min(127, vocab - 1)] = logits[4, min(128, vocab - 1)] = top  # a block boundary
    logits[5] = -np.inf  # nothing finite: index 0, as argmax
    logits[6, : vocab // 2] = -np.inf
    if vocab > 200:
        logits[7, [130, 129, 200]] = top  # a tie inside the second block
    got = jax.jit(greedy_tokens)(jnp.asarray(logits))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.argmax(logits, axis=-1))


def test_greedy_tokens_stay_in_the_vocabulary_on_nan():
    logits = jnp.zeros((2, 50)).at[0, 3].set(jnp.nan)
    got = np.asarray(greedy_tokens(logits))
    assert 0 <= got[0] < 50 and got[1] == 0
