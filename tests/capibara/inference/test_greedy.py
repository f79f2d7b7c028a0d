"""``greedy_tokens``: the argmax of each row, ties to the lowest index, always in range."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from capibara.core.inference.sampling import greedy_tokens


def test_greedy_tokens_equal_argmax_with_ties():
    logits = np.random.default_rng(0).standard_normal((9, 300)).astype(np.float32)
    logits[1, [4, 200]] = logits[1].max() + 1.0  # a tie: the first one wins
    logits[2, -1] = logits[2].max() + 1.0  # the last index
    logits[3] = 0.0  # all equal
    got = jax.jit(greedy_tokens)(jnp.asarray(logits))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.argmax(logits, axis=-1))


def test_greedy_tokens_stay_in_the_vocabulary_on_nan():
    logits = jnp.zeros((2, 50)).at[0, 3].set(jnp.nan)
    got = np.asarray(greedy_tokens(logits))
    assert 0 <= got[0] < 50 and got[1] == 0
