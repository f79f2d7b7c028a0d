"""Checkpoint errors name what is in the file: a mis-shaped tensor by its safetensors
key, with its shape as stored and the shape the model expects there (file layout).

Each checkpoint is a tiny random model written by ``save_pretrained`` (real
``model.safetensors`` under Hugging Face tensor names), then one or two tensors
rewritten with the wrong shape. (The same with a transformers-written checkpoint is
in ``test_hf_parity.py``.)
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from capibara.core.config import preset
from capibara.core.model import CapibaraModel


def _checkpoint(tmp_path, name: str, wrong: dict[str, tuple[int, ...]]) -> dict:
    """Saves a ``preset(name)`` model, rewrites the ``wrong`` tensors at those shapes
    (dense ones, in the file's ``[out, in]`` layout); returns the tensors as saved."""
    model = CapibaraModel(preset(name, implementation="xla"), rngs=nnx.Rngs(0))
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    saved = dict(tensors)
    rng = np.random.default_rng(0)
    for key, shape in wrong.items():
        assert key in tensors, key
        tensors[key] = rng.standard_normal(shape).astype(np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return saved


# tiny: d=64, 4 heads of 16, 2 kv heads, SwiGLU width 128; tiny-moe: 4 experts of width 128.
@pytest.mark.parametrize(
    "name,wrong",
    [
        ("tiny", {"model.layers.0.self_attn.k_proj.weight": (32, 48)}),
        ("tiny", {"model.layers.1.mlp.down_proj.weight": (64, 96)}),
        ("tiny", {"model.norm.weight": (65,)}),
        ("tiny", {"model.embed_tokens.weight": (255, 64), "lm_head.weight": (256, 63)}),
        ("tiny-moe", {"model.layers.1.block_sparse_moe.experts.2.w1.weight": (120, 64)}),
        ("tiny-moe", {"model.layers.0.block_sparse_moe.experts.3.w2.weight": (64, 64)}),
        ("tiny-moe", {"model.layers.0.block_sparse_moe.gate.weight": (5, 64)}),
    ],
    ids=["k_proj", "down_proj", "final-norm", "embed-and-head", "expert-w1", "expert-w2", "router"],
)
def test_shape_mismatch_names_the_file_tensor_and_both_file_shapes(tmp_path, name, wrong):
    saved = _checkpoint(tmp_path, name, wrong)
    with pytest.raises(ValueError, match="shape mismatches: ") as info:
        CapibaraModel.from_pretrained(tmp_path)
    message = str(info.value)
    for key, shape in wrong.items():
        expected = saved[key].shape
        assert f"{key}: shape {shape} in the checkpoint, the model expects {expected}" in message
        for s in (shape, expected):  # not our transposed [in, out] view of them
            if len(s) == 2 and s[::-1] not in (shape, expected):
                assert str(s[::-1]) not in message
    # Our parameter paths are not the file's names; every other tensor fitted.
    assert "stack." not in message and ".kernel" not in message and "embed.embedding" not in message
    assert "missing" not in message and "unexpected" not in message
    assert len(re.findall(r"in the checkpoint", message)) == len(wrong)


def test_a_fitting_checkpoint_still_loads(tmp_path):
    saved = _checkpoint(tmp_path, "tiny-moe", {})
    model = CapibaraModel.from_pretrained(tmp_path)
    w1 = saved["model.layers.1.block_sparse_moe.experts.2.w1.weight"]  # [f, d]
    w_gate_up = np.asarray(model.stack.layers[1].mlp.w_gate_up.get_value())  # [E, d, 2f]
    np.testing.assert_array_equal(w_gate_up[2, :, :128], w1.T)


def test_missing_checkpoint_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint directory {tmp_path / 'nope'} does"):
        CapibaraModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=f"checkpoint {tmp_path / 'file'} is not a dir"):
        CapibaraModel.from_pretrained(tmp_path / "file")
