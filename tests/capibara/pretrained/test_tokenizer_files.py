"""Tokenizers from files: a GGUF file's ``tokenizer.ggml.*`` metadata (byte-level BPE,
control tokens special, its chat template) and a Hugging Face directory's
``tokenizer_config.json`` (template, eos); bad inputs are named."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from gguf_files import write_gguf

from capibara.core import chat_template
from capibara.core.gguf import GGUFFile
from capibara.core.inference import HFTokenizer, load_tokenizer
from capibara.core.inference.tokenizer import tokenizer_from_gguf
from tests.capibara.tiny_hf import TINY_HF_CONFIG, build_tiny

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"


def _byte_vocab():
    """GPT-2's byte-to-unicode alphabet (256 tokens), 3 control tokens, two merges."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, "he", "hel"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, types, ["h e", "he l"]


def _tiny_gguf(tmp_path):
    tokens, types, merges = _byte_vocab()
    import transformers

    config = transformers.LlamaConfig(**{**TINY_HF_CONFIG, "vocab_size": len(tokens)})
    hf = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path / "tok.gguf"
    write_gguf(path, hf, scheme={"*": "F32"}, tokenizer=(tokens, types, merges, TEMPLATE))
    return path, tokens


def test_gguf_tokenizer_bpe_specials_digits_and_template(tmp_path):
    path, tokens = _tiny_gguf(tmp_path)
    tok = load_tokenizer(path)
    assert tok.vocab_size == len(tokens) and tok.eos_token_id == 2 and tok.bos_token_id == 1
    ids = tok.encode("<|im_start|>hello 42<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokens.index("hel") in ids  # the merges ran
    assert [tokens[i] for i in tok.encode("42")] == ["4", "2"]
    assert tok.decode(ids) == "hello 42"  # special tokens skipped
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hello 42<|im_end|>"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x<|im_end|>"


def test_gguf_tokenizer_refuses_an_unsupported_model(tmp_path):
    import gguf

    # A SentencePiece ("llama") tokenizer: written by the real writer, refused by name.
    hf = build_tiny("LlamaForCausalLM", "LlamaConfig")
    other = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(str(other), "llama")
    writer.add_block_count(2)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "a"])
    writer.add_tensor("token_embd.weight", hf.model.embed_tokens.weight.detach().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model='llama' is not supported"):
        tokenizer_from_gguf(GGUFFile(other))


def test_hf_directory_template_and_eos_from_tokenizer_config(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1, "</s>": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": {"content": "</s>"}, "chat_template": TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.eos_token_id == 2
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi</s>"
    (tmp_path / "copy").mkdir()
    tok.save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    assert again.eos_token_id == 2 and again.chat_template == TEMPLATE


def test_bad_messages_are_named():
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict with 'role' and 'content'"):
        chat_template.render(None, [{"role": "user", "content": "a"}, {"text": "b"}])
    with pytest.raises(TypeError, match="messages must be a list of dicts, got str"):
        chat_template.render(None, "hello")


def test_template_raise_exception_reaches_the_caller():
    from jinja2.exceptions import TemplateError

    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="user first"):
        chat_template.render(template, [{"role": "assistant", "content": "a"}])
