"""Checkpoints: Hugging Face safetensors in, Capibara checkpoints out (and back in).

A Hugging Face directory holds ``config.json`` and ``model.safetensors`` (or shards
listed in ``model.safetensors.index.json``). A Capibara checkpoint holds the same
tensor names (so dense ones stay loadable by transformers) and ``capibara_config.json``,
which wins over ``config.json`` when both exist.

Names map one to one: our module tree mirrors Hugging Face's (``stack.layers.3.mlp.
up_proj.kernel`` <-> ``model.layers.3.mlp.up_proj.weight``); linear kernels are stored
``[in, out]`` here and ``[out, in]`` there. Mixtral's per-expert weights are stacked
into ``[E, ...]`` arrays here.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from capibara.core.config import CapibaraConfig, ConfigurationManager

CAPIBARA_CONFIG = "capibara_config.json"


@dataclasses.dataclass(frozen=True)
class _Entry:
    """How one of our parameters is stored: its HF tensor names and the conversions."""

    names: tuple[str, ...]
    load: Callable[[list[np.ndarray]], np.ndarray]  # HF tensors -> our array
    save: Callable[[np.ndarray], list[np.ndarray]]  # our array -> HF tensors


def _plain(name: str) -> _Entry:
    return _Entry((name,), lambda ts: ts[0], lambda v: [v])


def _transposed(name: str) -> _Entry:
    # Linear kernels: ours [in, out], torch's [out, in].
    return _Entry((name,), lambda ts: ts[0].T, lambda v: [v.T])


def _stacked_experts(pattern: str, num_experts: int) -> _Entry:
    """``[E, in, out]`` <- E torch ``[out, in]`` tensors (Mixtral ``w2``)."""
    names = tuple(pattern.format(e=e) for e in range(num_experts))
    return _Entry(names, lambda ts: np.stack([t.T for t in ts]), lambda v: [w.T for w in v])


def _fused_gate_up(prefix: str, num_experts: int) -> _Entry:
    """``w_gate_up [E, d, 2f]`` <- Mixtral's ``w1`` (gate) and ``w3`` (up), ``[f, d]`` each."""
    gates = tuple(f"{prefix}.experts.{e}.w1.weight" for e in range(num_experts))
    ups = tuple(f"{prefix}.experts.{e}.w3.weight" for e in range(num_experts))

    def load(ts):
        return np.stack(
            [
                np.concatenate([g.T, u.T], axis=-1)
                for g, u in zip(ts[:num_experts], ts[num_experts:], strict=True)
            ]
        )

    def save(v):
        f = v.shape[-1] // 2
        return [w[:, :f].T for w in v] + [w[:, f:].T for w in v]

    return _Entry(gates + ups, load, save)


_DENSE_LAYER = {
    "input_layernorm.weight": _plain,
    "post_attention_layernorm.weight": _plain,
    **{f"self_attn.{p}_proj.kernel": _transposed for p in "qkvo"},
    **{f"self_attn.{p}_proj.bias": _plain for p in "qkv"},
    **{f"mlp.{p}_proj.kernel": _transposed for p in ("gate", "up", "down")},
}


def _entry(path: str, shape: tuple[int, ...]) -> _Entry | None:
    """Our dotted parameter path (and its shape) -> its checkpoint entry, or None."""
    top = {
        "embed.embedding": _plain("model.embed_tokens.weight"),
        "head.norm.weight": _plain("model.norm.weight"),
        "head.lm_head": _transposed("lm_head.weight"),
    }
    if path in top:
        return top[path]
    m = re.fullmatch(r"stack\.layers\.(\d+)\.(.+)", path)
    if not m:
        return None
    layer, rest = m.groups()
    prefix = f"model.layers.{layer}"
    if rest in _DENSE_LAYER:
        hf = rest.replace(".kernel", ".weight")
        return _DENSE_LAYER[rest](f"{prefix}.{hf}")
    moe = f"{prefix}.block_sparse_moe"
    if rest == "mlp.router.kernel":
        return _transposed(f"{moe}.gate.weight")
    if rest == "mlp.w_gate_up":
        return _fused_gate_up(moe, shape[0])
    if rest == "mlp.w_down":
        return _stacked_experts(f"{moe}.experts.{{e}}.w2.weight", shape[0])
    return None


def safetensors_files(directory: pathlib.Path) -> list[str]:
    """The safetensors file names of a directory: the shards its index names, else
    every ``*.safetensors``; ``FileNotFoundError`` when there is none."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {directory}")
    return files


def read_safetensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of a directory: one ``model.safetensors`` or the shards of its index."""
    files = safetensors_files(directory)
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
    return tensors


def load_config(directory: pathlib.Path, **overrides) -> CapibaraConfig:
    if not directory.is_dir():
        if directory.exists():
            raise NotADirectoryError(f"checkpoint {directory} is not a directory")
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    own = directory / CAPIBARA_CONFIG
    if own.exists():
        config = ConfigurationManager.load(own)
        return config.replace(**overrides) if overrides else config
    if (directory / "config.json").exists():
        return ConfigurationManager.from_hf_config(directory, **overrides)
    raise FileNotFoundError(f"neither {CAPIBARA_CONFIG} nor config.json in {directory}")


def _file_shapes(entry: _Entry, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes ``entry.names`` must have in the file for a parameter of ``shape``.

    What ``entry.save`` would write, run on a zero-strided view: no memory is taken,
    and the layout (transposes, expert splits) has one definition, the save's.
    """
    view = np.broadcast_to(np.zeros((), np.int8), shape)
    return [tuple(t.shape) for t in entry.save(view)]


def _dense_kernels(model) -> dict[str, np.ndarray]:
    """Block-sparse linears' kernels densified, by parameter path (checkpoints store dense)."""
    return {
        ".".join(map(str, (*path, "kernel"))): np.asarray(module.dense_kernel())
        for path, module in nnx.iter_graph(model)
        if getattr(module, "sparse_layout", None) is not None
    }


def _flat_params(model) -> dict[str, nnx.Variable]:
    """Trainable parameters by dotted path (buffers such as RoPE tables are not saved)."""
    _, state, _ = nnx.split(model, nnx.Param, ...)
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def load_weights(model, tensors: dict[str, np.ndarray]) -> None:
    """Copies ``tensors`` (HF names) into ``model`` in place; every name must be used once.

    Raises:
      ValueError: listing the model parameters with no tensor, the tensors no parameter
        takes, and shape mismatches -- all of them, not just the first. A mismatch
        names the file's tensor, its shape in the file and the shape the model needs
        there, both in the file's layout (``[out, in]`` for linear weights).
    """
    used: set[str] = set()
    missing, mismatched = [], []
    for path, var in _flat_params(model).items():
        current = var.get_value()
        entry = _entry(path, current.shape)
        if entry is None:
            missing.append(f"{path} (no checkpoint name)")
            continue
        absent = [n for n in entry.names if n not in tensors]
        if absent:
            missing.extend(absent)
            continue
        used.update(entry.names)
        # Checked per file tensor, before the conversion: a wrong expert tensor would
        # otherwise fail inside np.stack, and a transposed shape names no file tensor.
        wrong = [
            f"{name}: shape {tuple(tensors[name].shape)} in the checkpoint, "
            f"the model expects {want}"
            for name, want in zip(entry.names, _file_shapes(entry, current.shape), strict=True)
            if tuple(tensors[name].shape) != want
        ]
        if wrong:
            mismatched.extend(wrong)
            continue
        value = entry.load([tensors[n] for n in entry.names])
        var.set_value(jnp.asarray(value, current.dtype))
    unexpected = sorted(set(tensors) - used)
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if problems:
        raise ValueError("checkpoint does not fit the model: " + " | ".join(problems))


def state_tensors(model) -> dict[str, np.ndarray]:
    """The model's parameters under their Hugging Face names (dense numpy arrays)."""
    serving = [
        ".".join(map(str, path))
        for path, module in nnx.iter_graph(model)
        if getattr(module, "kernel_out_in", False) or getattr(module, "lm_head_out_in", False)
    ]
    if serving:
        raise ValueError(
            f"{serving[0]} holds an [out, in] serving copy of its weights (made by an "
            "inference engine); save the model it was made from"
        )
    tensors: dict[str, np.ndarray] = {}
    dense_kernels = _dense_kernels(model)
    for path, var in _flat_params(model).items():
        value = dense_kernels.get(path, np.asarray(var.get_value()))
        entry = _entry(path, value.shape)
        if entry is None:
            raise ValueError(f"parameter {path} has no checkpoint name")
        for name, tensor in zip(entry.names, entry.save(value), strict=True):
            tensors[name] = np.ascontiguousarray(tensor)
    return tensors


def save(model, directory: str | pathlib.Path) -> None:
    """Writes ``model.safetensors`` and ``capibara_config.json`` into ``directory``."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_tensors(model), str(directory / "model.safetensors"))
    ConfigurationManager.save(model.config, directory / CAPIBARA_CONFIG)
