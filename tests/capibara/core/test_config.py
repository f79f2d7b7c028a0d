"""CapibaraConfig validation, presets, and ConfigurationManager load/save/overrides/HF."""

from __future__ import annotations

import json

import pytest

from capibara.core.config import PRESETS, CapibaraConfig, ConfigurationManager, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip_through_json_and_yaml(name, tmp_path):
    config = PRESETS[name]
    for suffix in (".json", ".yaml"):
        path = tmp_path / f"config{suffix}"
        ConfigurationManager.save(config, path)
        assert ConfigurationManager.load(path) == config


def test_preset_sizes():
    # The sizes the presets are named for, from the parameter formula.
    assert 100e6 < preset("small").num_parameters() < 150e6
    assert 7.9e9 < preset("llama-3-8b").num_parameters() < 8.1e9
    assert 46e9 < preset("mixtral-8x7b").num_parameters() < 47.5e9
    assert preset("moe-small").num_experts == 8 and preset("moe-small").num_experts_per_token == 2


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"num_heads": 6, "num_kv_heads": 2}, "num_heads"),  # does not divide hidden_size=64
        ({"num_kv_heads": 3}, "num_kv_heads"),  # does not divide num_heads=4
        ({"num_experts": 4, "num_experts_per_token": 5}, "num_experts_per_token"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"router_score": "relu"}, "router_score"),
        ({"router_kind": "hash"}, "router_kind"),
        ({"mod_capacity": 0.0}, "mod_capacity"),
        ({"moe_layers": (5,)}, "moe_layers"),
        ({"sparsity": 1.5}, "sparsity"),
        ({"sparse_targets": ("embedding",)}, "sparse_targets"),
        ({"compute_dtype": "int8"}, "compute_dtype"),
        ({"implementation": "triton"}, "implementation"),
        ({"mesh_shape": (2, 2, 2)}, "mesh_shape"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"sliding_window": 0}, "sliding_window"),
    ],
)
def test_impossible_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        CapibaraConfig(**changes)


def test_overrides_are_parsed_and_type_checked():
    config = ConfigurationManager.apply_overrides(
        preset("tiny"),
        [
            "num_layers=4",
            "compute_dtype=bfloat16",
            "capacity_factor=1.25",
            "moe_layers=[1, 3]",
            "num_experts=4",
            "tie_embeddings=true",
            "capacity_factor=null",
        ],
    )
    assert config.num_layers == 4 and config.compute_dtype == "bfloat16"
    assert config.moe_layers == (1, 3) and config.tie_embeddings is True
    assert config.capacity_factor is None
    with pytest.raises(ValueError, match="num_layers: expected an int"):
        ConfigurationManager.apply_overrides(preset("tiny"), ["num_layers=two"])
    with pytest.raises(ValueError, match="unknown config field 'layers'"):
        ConfigurationManager.apply_overrides(preset("tiny"), ["layers=2"])
    with pytest.raises(ValueError, match="key=value"):
        ConfigurationManager.apply_overrides(preset("tiny"), ["num_layers"])
    with pytest.raises(ValueError, match="num_heads"):  # validated after the override
        ConfigurationManager.apply_overrides(preset("tiny"), ["num_heads=3"])


def test_unknown_fields_in_a_file_are_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"hidden_size": 64, "n_embd": 3}))
    with pytest.raises(ValueError, match=r"unknown config field.*n_embd"):
        ConfigurationManager.load(path)


HF_LLAMA = {
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 512,
    "torch_dtype": "float32",
}


def test_from_hf_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_LLAMA))
    config = ConfigurationManager.from_hf_config(tmp_path, implementation="xla")
    assert (config.num_heads, config.num_kv_heads, config.resolved_head_dim) == (8, 2, 8)
    assert config.rope_theta == 500000.0 and config.norm_eps == 1e-6
    assert config.num_experts == 0 and config.implementation == "xla"


def test_from_hf_mixtral_qwen2_mistral():
    mixtral = ConfigurationManager.from_hf_config(
        {**HF_LLAMA, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}
    )
    assert (mixtral.num_experts, mixtral.num_experts_per_token) == (4, 2)
    qwen2 = ConfigurationManager.from_hf_config(
        {**HF_LLAMA, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}
    )
    assert qwen2.attention_bias and qwen2.sliding_window is None
    mistral = ConfigurationManager.from_hf_config(
        {**HF_LLAMA, "model_type": "mistral", "sliding_window": 4096}
    )
    assert mistral.sliding_window == 4096 and not mistral.attention_bias


def test_unsupported_hf_model_type():
    with pytest.raises(ValueError, match="unsupported Hugging Face model_type 'gpt2'"):
        ConfigurationManager.from_hf_config({**HF_LLAMA, "model_type": "gpt2"})


def test_from_hf_reads_transformers_5_rope_parameters():
    config = ConfigurationManager.from_hf_config(
        {
            **HF_LLAMA,
            "rope_theta": None,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 1234.0, "factor": 8.0},
        }
    )
    assert config.rope_theta == 1234.0
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0}
