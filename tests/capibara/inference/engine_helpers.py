"""Shared pieces of the engine tests: one engine size, prompts, a no-cache reference.

Engines here share one ``EngineConfig`` size, so they share compiled steps (the step
is jitted at module level): the whole directory compiles a handful of shapes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capibara.core.inference import CapibaraInference, EngineConfig

CONFIG = EngineConfig(
    max_slots=8,
    max_seq_len=96,
    page_size=8,
    num_pages=64,
    prefill_chunk=16,
    min_prefill_bucket=8,
)


def make_engine(model, tokenizer=None, **overrides) -> CapibaraInference:
    return CapibaraInference(model, dataclasses.replace(CONFIG, **overrides), tokenizer)


def prompts(n: int, lengths=(1, 40), seed=0, vocab=256) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, int(rng.integers(*lengths)))] for _ in range(n)]


@functools.cache
def _reference_forward(graphdef, length: int):
    @jax.jit
    def last_logits(state, tokens, last):  # tokens [1, length] right-padded
        logits, _ = nnx.merge(graphdef, state)(tokens)
        return logits[0, last]

    return last_logits


def reference_greedy(model, prompt: list[int], max_tokens: int, length: int = 96) -> list[int]:
    """Greedy tokens from the full forward over the whole sequence at every step (no KV
    cache; right padding to a fixed length is invisible to the causal last position)."""
    graphdef, state = nnx.split(model)
    forward = _reference_forward(graphdef, length)
    tokens = list(prompt)
    for _ in range(max_tokens):
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(tokens)] = tokens
        tokens.append(int(jnp.argmax(forward(state, jnp.asarray(padded), len(tokens) - 1))))
    return tokens[len(prompt) :]
