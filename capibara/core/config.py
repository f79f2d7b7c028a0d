"""Model configuration: ``CapibaraConfig`` and the ``ConfigurationManager`` that loads it.

``CapibaraConfig`` is a frozen dataclass validated on construction: an impossible value
raises ``ValueError`` naming the field. ``ConfigurationManager`` reads and writes JSON and
YAML, applies ``key=value`` overrides with type checking, and translates a Hugging Face
``config.json`` (Llama, Mistral, Mixtral, Qwen2).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

ROUTER_KINDS = ("token", "expert_choice")
EXPERT_EXCHANGES = ("ragged_all_to_all", "all_gather")  # = capibara.kernels.moe.EXCHANGES
SCORE_FUNCTIONS = ("softmax", "sigmoid")
MOD_FAST_PATHS = ("residual", "mlp")
IMPLEMENTATIONS = (None, "pallas", "xla", "reference")
DTYPES = ("float32", "bfloat16", "float16")
SPARSE_TARGETS = ("mlp", "attention")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CapibaraConfig:
    """Everything that defines a Capibara model. Defaults are the ``tiny`` preset's."""

    # -- transformer -------------------------------------------------------------------
    vocab_size: int = 256  # byte-level tokenizer's vocabulary
    hidden_size: int = 64  # d_model
    num_layers: int = 2
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # GQA: each kv head serves num_heads // num_kv_heads query heads
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int = 128  # SwiGLU hidden width (per expert for MoE layers)
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3 style {"rope_type": "llama3", "factor": ...}
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # output head reuses the embedding matrix
    attention_bias: bool = False  # q/k/v projections with bias (Qwen2)
    sliding_window: int | None = None  # a query sees the last w keys (Mistral v0.1)

    # -- mixture of experts --------------------------------------------------------------
    num_experts: int = 0  # 0: every layer has a dense MLP
    num_experts_per_token: int = 2  # top-k
    num_shared_experts: int = 0  # always-on experts added to the routed ones
    moe_layers: tuple[int, ...] | None = None  # None: every layer (when num_experts > 0)
    router_kind: str = "token"  # "token" (top-k per token) | "expert_choice"
    router_score: str = "softmax"  # "softmax" | "sigmoid"
    router_renormalize: bool = True  # renormalise the top-k weights to sum to 1
    capacity_factor: float | None = None  # None: dropless
    router_aux_loss_coef: float = 0.01  # Switch load-balancing loss weight
    router_z_loss_coef: float = 0.001  # ST-MoE router z-loss weight
    router_bias_update_rate: float = 0.0  # >0: DeepSeek-V3 aux-loss-free balancing
    router_jitter: float = 0.0  # multiplicative noise on router inputs, training only
    # tokens to experts on an ``expert`` mesh axis: None (per platform) |
    # "ragged_all_to_all" | "all_gather" (capibara.kernels.moe.run_experts)
    expert_exchange: str | None = None

    # -- mixture of depths ---------------------------------------------------------------
    mod_layers: tuple[int, ...] = ()  # layers whose block is skipped by some tokens
    mod_capacity: float = 0.5  # fraction of tokens that take the full block
    mod_fast_path: str = "residual"  # "residual" | "mlp"

    # -- block sparsity ------------------------------------------------------------------
    sparse_targets: tuple[str, ...] = ()  # subset of ("mlp", "attention")
    sparse_block_shape: tuple[int, int] = (128, 128)
    sparsity: float = 0.0

    # -- numerics and kernels ------------------------------------------------------------
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    implementation: str | None = None  # kernel implementation for every op
    interpret_kernels: bool = False  # run Pallas kernels in the interpreter (CPU tests)

    # -- sharding ------------------------------------------------------------------------
    mesh_shape: tuple[int, ...] = (1, 1)
    mesh_axes: tuple[str, ...] = ("data", "model")

    def __post_init__(self):
        _validate(self)

    # -- derived -------------------------------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def is_moe_layer(self, layer: int) -> bool:
        if self.num_experts == 0:
            return False
        return self.moe_layers is None or layer in self.moe_layers

    def replace(self, **changes) -> CapibaraConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CapibaraConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, hints[k], v) for k, v in data.items()})

    def num_parameters(self) -> int:
        """Parameter count of the model this config builds (dense weights, no sparsity)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.resolved_head_dim
        attn = d * hd * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * hd * d
        if self.attention_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        total = self.vocab_size * d * (1 if self.tie_embeddings else 2) + d  # + final norm
        for layer in range(self.num_layers):
            if self.is_moe_layer(layer):
                mlp = (self.num_experts + self.num_shared_experts) * 3 * d * f
                mlp += d * self.num_experts  # router
            else:
                mlp = 3 * d * f
            total += attn + mlp + 2 * d  # two RMSNorms
            if layer in self.mod_layers:
                total += d  # MoD router
        return total


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field}: {message}")


def _validate(c: CapibaraConfig) -> None:
    for name in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "intermediate_size",
        "max_position_embeddings",
    ):
        value = getattr(c, name)
        _check(isinstance(value, int) and value > 0, name, f"must be a positive int, got {value!r}")
    _check(
        c.num_kv_heads <= c.num_heads and c.num_heads % c.num_kv_heads == 0,
        "num_kv_heads",
        f"must divide num_heads={c.num_heads}, got {c.num_kv_heads}",
    )
    if c.head_dim is None:
        _check(
            c.hidden_size % c.num_heads == 0,
            "num_heads",
            f"must divide hidden_size={c.hidden_size} (or set head_dim), got {c.num_heads}",
        )
    else:
        _check(c.head_dim > 0, "head_dim", f"must be positive, got {c.head_dim}")
    _check(
        c.sliding_window is None or c.sliding_window > 0,
        "sliding_window",
        f"must be None or positive, got {c.sliding_window}",
    )
    _check(c.rope_theta > 0, "rope_theta", f"must be positive, got {c.rope_theta}")
    _check(c.norm_eps > 0, "norm_eps", f"must be positive, got {c.norm_eps}")
    _check(c.num_experts >= 0, "num_experts", f"must be >= 0, got {c.num_experts}")
    if c.num_experts:
        _check(
            1 <= c.num_experts_per_token <= c.num_experts,
            "num_experts_per_token",
            f"top-k must be in [1, num_experts={c.num_experts}], got {c.num_experts_per_token}",
        )
    _check(
        c.num_shared_experts >= 0, "num_shared_experts", f"must be >= 0, got {c.num_shared_experts}"
    )
    for name, layers in (("moe_layers", c.moe_layers or ()), ("mod_layers", c.mod_layers)):
        bad = [i for i in layers if not 0 <= i < c.num_layers]
        _check(not bad, name, f"layer indices {bad} outside [0, num_layers={c.num_layers})")
    _check(
        c.router_kind in ROUTER_KINDS,
        "router_kind",
        f"must be one of {ROUTER_KINDS}, got {c.router_kind!r}",
    )
    _check(
        c.router_score in SCORE_FUNCTIONS,
        "router_score",
        f"must be one of {SCORE_FUNCTIONS}, got {c.router_score!r}",
    )
    _check(
        c.expert_exchange in (None, *EXPERT_EXCHANGES),
        "expert_exchange",
        f"must be None or one of {EXPERT_EXCHANGES}, got {c.expert_exchange!r}",
    )
    _check(
        c.capacity_factor is None or c.capacity_factor > 0,
        "capacity_factor",
        f"must be None (dropless) or > 0, got {c.capacity_factor}",
    )
    for name in (
        "router_aux_loss_coef",
        "router_z_loss_coef",
        "router_bias_update_rate",
        "router_jitter",
    ):
        _check(getattr(c, name) >= 0, name, f"must be >= 0, got {getattr(c, name)}")
    _check(0 < c.mod_capacity <= 1, "mod_capacity", f"must be in (0, 1], got {c.mod_capacity}")
    _check(
        c.mod_fast_path in MOD_FAST_PATHS,
        "mod_fast_path",
        f"must be one of {MOD_FAST_PATHS}, got {c.mod_fast_path!r}",
    )
    bad_targets = sorted(set(c.sparse_targets) - set(SPARSE_TARGETS))
    _check(
        not bad_targets,
        "sparse_targets",
        f"unknown target(s) {bad_targets}; choose from {SPARSE_TARGETS}",
    )
    _check(0 <= c.sparsity <= 1, "sparsity", f"must be in [0, 1], got {c.sparsity}")
    _check(
        len(c.sparse_block_shape) == 2 and min(c.sparse_block_shape) > 0,
        "sparse_block_shape",
        f"must be two positive ints, got {c.sparse_block_shape}",
    )
    for name in ("param_dtype", "compute_dtype"):
        _check(
            getattr(c, name) in DTYPES, name, f"must be one of {DTYPES}, got {getattr(c, name)!r}"
        )
    _check(
        c.implementation in IMPLEMENTATIONS,
        "implementation",
        f"must be one of {IMPLEMENTATIONS}, got {c.implementation!r}",
    )
    _check(
        len(c.mesh_shape) == len(c.mesh_axes),
        "mesh_shape",
        f"has {len(c.mesh_shape)} dims but mesh_axes={c.mesh_axes} names {len(c.mesh_axes)}",
    )
    _check(all(s > 0 for s in c.mesh_shape), "mesh_shape", f"must be positive, got {c.mesh_shape}")


# -- presets ---------------------------------------------------------------------------

PRESETS: dict[str, CapibaraConfig] = {
    # For tests: a few thousand parameters, runs everywhere (interpret mode included).
    "tiny": CapibaraConfig(),
    "tiny-moe": CapibaraConfig(num_experts=4, num_experts_per_token=2),
    # ~125M parameters, dense (GPT-2-small-like sizes with a Llama block).
    "small": CapibaraConfig(
        vocab_size=32000,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        intermediate_size=2048,
        tie_embeddings=True,
    ),
    # 8 experts, top-2, on the small config's attention.
    "moe-small": CapibaraConfig(
        vocab_size=32000,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        intermediate_size=1024,
        tie_embeddings=True,
        num_experts=8,
        num_experts_per_token=2,
    ),
    # Shapes of real models, for sizing and sharding (not run on CPU).
    "llama-3-8b": CapibaraConfig(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        norm_eps=1e-5,
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
    ),
    "mixtral-8x7b": CapibaraConfig(
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        max_position_embeddings=32768,
        rope_theta=1e6,
        norm_eps=1e-5,
        num_experts=8,
        num_experts_per_token=2,
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
    ),
}


def preset(name: str, **overrides) -> CapibaraConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# -- (de)serialisation helpers -----------------------------------------------------------


def _to_plain(value):
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _coerce(name: str, hint, value):
    """Converts a JSON/YAML/CLI value to the field's declared type, or raises naming it."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, arg, value)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"{name}: {value!r} does not fit {hint}") from None
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(name, item, v) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{name}: expected an int, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{name}: expected a string, got {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ValueError(f"{name}: expected a mapping, got {value!r}")
    return value


class ConfigurationManager:
    """Loads, saves and overrides ``CapibaraConfig`` values.

    Example:
      cfg = ConfigurationManager.load("model.yaml")
      cfg = ConfigurationManager.apply_overrides(cfg, ["num_layers=4", "compute_dtype=bfloat16"])
      cfg = ConfigurationManager.from_hf_config("checkpoints/llama/config.json")
    """

    @staticmethod
    def load(path: str | pathlib.Path) -> CapibaraConfig:
        """Reads a ``.json``, ``.yaml`` or ``.yml`` file of config fields."""
        path = pathlib.Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file must be .json, .yaml or .yml, got {path.name!r}")
        if not isinstance(data, dict):
            raise ValueError(
                f"{path}: expected a mapping of config fields, got {type(data).__name__}"
            )
        return CapibaraConfig.from_dict(data)

    @staticmethod
    def save(config: CapibaraConfig, path: str | pathlib.Path) -> None:
        path = pathlib.Path(path)
        data = config.to_dict()
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        elif path.suffix == ".json":
            path.write_text(json.dumps(data, indent=2) + "\n")
        else:
            raise ValueError(f"config file must be .json, .yaml or .yml, got {path.name!r}")

    @staticmethod
    def apply_overrides(config: CapibaraConfig, overrides: Iterable[str]) -> CapibaraConfig:
        """Applies ``key=value`` strings; values are parsed as YAML scalars/lists.

        ``num_layers=4``, ``capacity_factor=null``, ``moe_layers=[1,3]``,
        ``compute_dtype=bfloat16``. Each value must fit the field's type.
        """
        data = config.to_dict()
        hints = typing.get_type_hints(CapibaraConfig)
        for item in overrides:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"override must look like key=value, got {item!r}")
            if key not in hints:
                raise ValueError(f"unknown config field {key!r} in override {item!r}")
            data[key] = _coerce(key, hints[key], yaml.safe_load(raw))
        return CapibaraConfig.from_dict(data)

    @staticmethod
    def from_hf_config(
        source: str | pathlib.Path | Mapping[str, Any], **overrides
    ) -> CapibaraConfig:
        """Builds the config of a Hugging Face checkpoint from its ``config.json``.

        Args:
          source: path to ``config.json`` or to the directory holding it, or the dict.
          overrides: fields to set on top (e.g. ``implementation="xla"``).
        """
        if isinstance(source, Mapping):
            hf = dict(source)
        else:
            path = pathlib.Path(source)
            if path.is_dir():
                path = path / "config.json"
            hf = json.loads(path.read_text())
        return CapibaraConfig.from_dict({**_translate_hf(hf), **overrides})


HF_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2")
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _translate_hf(hf: dict[str, Any]) -> dict[str, Any]:
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"unsupported Hugging Face model_type {model_type!r}; supported: {HF_MODEL_TYPES}"
        )
    heads = hf["num_attention_heads"]
    # transformers >= 5 nests theta and scaling in "rope_parameters"; older files
    # have top-level "rope_theta" and "rope_scaling".
    rope = hf.get("rope_parameters") or {}
    fields: dict[str, Any] = {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "intermediate_size": hf["intermediate_size"],
        "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "rope_theta": float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0),
        "rope_scaling": _rope_scaling(rope, hf.get("rope_scaling")),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attention_bias": bool(hf.get("attention_bias", model_type == "qwen2")),
    }
    if model_type == "mixtral":
        fields["num_experts"] = hf["num_local_experts"]
        fields["num_experts_per_token"] = hf["num_experts_per_tok"]
        fields["router_aux_loss_coef"] = float(hf.get("router_aux_loss_coef", 0.01))
        fields["router_jitter"] = float(hf.get("router_jitter_noise", 0.0))
    # Qwen2 carries a sliding_window value but only uses it with use_sliding_window.
    if hf.get("sliding_window") and hf.get("use_sliding_window", model_type != "qwen2"):
        fields["sliding_window"] = int(hf["sliding_window"])
    dtype = _HF_DTYPES.get(str(hf.get("torch_dtype") or hf.get("dtype") or "float32"))
    if dtype:
        fields["param_dtype"] = dtype
    return fields


def _rope_scaling(rope_parameters: dict, legacy: dict | None) -> dict | None:
    if rope_parameters.get("rope_type", "default") != "default":
        return {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    return legacy
