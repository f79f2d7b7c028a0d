"""Greedy tokens equal transformers' ``generate(do_sample=False)`` on tiny random Llama
and Mixtral checkpoints written by ``save_pretrained`` and served by the engine."""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import make_engine

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from capibara.core.inference import SamplingParams  # noqa: E402
from capibara.core.model import CapibaraModel  # noqa: E402
from tests.capibara.tiny_hf import build_tiny  # noqa: E402

NEW_TOKENS = 10


@pytest.mark.parametrize(
    "cls_name,config_name,extra",
    [
        ("LlamaForCausalLM", "LlamaConfig", {}),
        ("MixtralForCausalLM", "MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    ],
    ids=["llama", "mixtral"],
)
def test_greedy_tokens_equal_transformers_generate(tmp_path, cls_name, config_name, extra):
    hf = build_tiny(cls_name, config_name, **extra)
    hf.save_pretrained(tmp_path)
    hf.generation_config.eos_token_id = None  # generate exactly NEW_TOKENS, like the engine
    hf.generation_config.pad_token_id = 0

    rng = np.random.default_rng(0)
    batch = [[int(t) for t in rng.integers(0, 97, n)] for n in (3, 11, 26)]
    expected = []
    for prompt in batch:
        ids = torch.tensor([prompt])
        with torch.no_grad():  # an explicit mask: else token 0 (= pad) would be masked
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
            )
        expected.append(out[0, len(prompt) :].tolist())

    model = CapibaraModel.from_pretrained(tmp_path, implementation="xla")
    engine = make_engine(model, min_prefill_bucket=16)
    gens = engine.generate_batch(batch, SamplingParams(max_tokens=NEW_TOKENS))
    engine.close()
    assert [list(g.token_ids) for g in gens] == expected
