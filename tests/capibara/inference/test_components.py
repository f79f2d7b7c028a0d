"""Host-side pieces without a model: page pool, prefix cache, tokenizers, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara.core.inference.kv_cache import SCRATCH_PAGE, OutOfPagesError, PagePool
from capibara.core.inference.params import SamplingParams
from capibara.core.inference.prefix_cache import PrefixCache
from capibara.core.inference.sampling import SamplingBatch
from capibara.core.inference.sampling import sample as _sample
from capibara.core.inference.tokenizer import (
    ByteTokenizer,
    IncrementalDecoder,
    load_tokenizer,
)


def test_page_pool_free_list_and_refcounts():
    pool = PagePool(5)
    pages = [pool.allocate() for _ in range(4)]
    assert SCRATCH_PAGE not in pages and sorted(pages) == [1, 2, 3, 4]
    with pytest.raises(OutOfPagesError):
        pool.allocate()
    pool.retain(pages[0])
    pool.release(pages[0])
    assert pool.num_free == 0  # still referenced once
    for page in pages:
        pool.release(page)
    assert pool.num_free == pool.capacity == 4
    with pytest.raises(ValueError, match="double free"):
        pool.release(pages[1])
    pool.check()


def test_prefix_cache_hash_chain_sharing_and_lru_eviction():
    pool = PagePool(9)
    cache = PrefixCache(pool, page_size=2)
    seq = [1, 2, 3, 4, 5, 6, 7]
    pages = [pool.allocate() for _ in range(3)]  # a request wrote blocks (1,2) (3,4) (5,6)
    parent = 0
    for i, page in enumerate(pages):
        parent = cache.insert(parent, tuple(seq[2 * i : 2 * i + 2]), page)
    for page in pages:  # the request finishes: only the cache holds them
        pool.release(page)
    assert pool.num_free == pool.capacity - 3 and cache.num_evictable() == 3

    hit, _ = cache.match([1, 2, 3, 4, 5, 6, 9])
    assert hit == pages  # all three blocks (one token left to compute)
    hit2, _ = cache.match([1, 2, 3, 4, 5, 6])
    assert hit2 == pages[:2]  # the last token must stay uncached
    miss, _ = cache.match([1, 2, 9, 4, 5, 6, 7])
    assert miss == pages[:1]  # the chain stops at the first different block
    other, _ = cache.match([3, 4, 5, 6, 7])
    assert other == []  # same tokens at another offset: a different chain
    assert cache.hit_rate == pytest.approx((6 + 4 + 2) / (7 + 6 + 7 + 5))

    for page in hit + hit2 + miss:  # those requests finish
        pool.release(page)
    cache.match([1, 2, 3])  # touch block 0 so it is most recently used
    pool.release(pages[0])
    assert cache.evict(1) == 1  # block 2, the least recently used
    again, _ = cache.match([1, 2, 3, 4, 5, 6, 7])
    assert again == pages[:2]
    for page in again:
        pool.release(page)
    cache.clear()
    assert pool.num_free == pool.capacity
    pool.check()


def test_byte_tokenizer_round_trip_and_incremental_utf8():
    tok = ByteTokenizer()
    text = "héllo 🦫!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) + decoder.flush() == text
    assert all("\ufffd" not in d for d in deltas)  # no half characters streamed


def test_incremental_decoder_holds_back_a_possible_stop_string():
    tok = ByteTokenizer()
    decoder = IncrementalDecoder(tok, stop=("END",))
    shown = "".join(decoder.push(i) for i in tok.encode("abcEN"))
    assert shown == "abc" and not decoder.stopped
    decoder.push(ord("D"))
    assert decoder.stopped and decoder.text == "abc" and decoder.flush() == ""


def test_hf_tokenizer_json_is_used_when_present(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    hf = tokenizers.Tokenizer(model)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text('{"eos_token_id": 3}')
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hello world") == [1, 2] and tok.eos_token_id == 3
    assert tok.decode([1, 2]) == "hello world"
    assert isinstance(load_tokenizer(tmp_path / "missing"), ByteTokenizer)


sample = jax.jit(_sample)  # one compilation for all the draws below


def _batch(params, rows=1, counter=0, seed=0):
    return SamplingBatch.build([(params, seed, counter)] * rows)


def test_sampling_filters_keep_only_allowed_tokens():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 50)) * 3, jnp.float32)
    order = np.argsort(-np.asarray(logits[0]))
    probs = np.exp(np.asarray(logits[0]) - np.max(logits))
    probs /= probs.sum()
    top_k = {int(t) for t in order[:3]}
    nucleus = {int(t) for t in order[: np.searchsorted(np.cumsum(probs[order]), 0.5) + 1]}
    min_p = {int(t) for t in np.flatnonzero(probs >= 0.2 * probs.max())}
    for params, allowed in (
        (SamplingParams(temperature=1.0, top_k=3), top_k),
        (SamplingParams(temperature=1.0, top_p=0.5), nucleus),
        (SamplingParams(temperature=1.0, min_p=0.2), min_p),
    ):
        drawn = {int(sample(logits, _batch(params, counter=c))[0]) for c in range(100)}
        assert drawn <= allowed and len(drawn) > 1, (params, drawn, allowed)


def test_sampling_is_a_function_of_seed_and_counter_only():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 30)), jnp.float32)
    params = SamplingParams(temperature=1.0)
    rows = [(params, 7, 3), None, (params, 7, 3), (params, 8, 3)]
    out = np.asarray(sample(logits.at[2].set(logits[0]), SamplingBatch.build(rows)))
    assert out[0] == out[2]  # same seed, counter and logits: same token, any row
    assert out[1] == int(jnp.argmax(logits[1]))  # an idle row is greedy
    alone = sample(logits[:1], SamplingBatch.build(rows[:1]))
    assert int(alone[0]) == out[0]
