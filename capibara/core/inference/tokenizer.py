"""Tokenizers: a Hugging Face ``tokenizer.json``, a GGUF file's vocabulary, or raw bytes.

All offer ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``eos_token_id`` (``None`` if there is none) and ``apply_chat_template(messages,
add_generation_prompt=True) -> str`` (the checkpoint's Jinja2 template, or plain ChatML
when it has none: see ``capibara.core.chat_template``). ``IncrementalDecoder`` turns a
stream of ids into text deltas without splitting a multi-byte character.

``load_tokenizer(path)`` picks one: a ``.gguf`` file -> ``tokenizer_from_gguf``; a
directory with ``tokenizer.json`` -> ``HFTokenizer``; nothing -> ``ByteTokenizer``.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence

from capibara.core import chat_template as _chat


class ByteTokenizer:
    """Token ``i`` is the byte ``i``: works with no files (vocab 256, no end token).

    Its chat template is ``chat_template.CHATML_TEMPLATE`` (the markup is encoded as
    plain bytes: a random-weight model has no special tokens to learn it from).
    """

    vocab_size = 256
    eos_token_id: int | None = None
    chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(
        self, messages: Sequence[Mapping], add_generation_prompt: bool = True
    ) -> str:
        """``messages`` as ChatML text (``CHATML_TEMPLATE``)."""
        return _chat.render(None, messages, add_generation_prompt=add_generation_prompt)


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (from ``tokenizer.json``, or built, e.g. from GGUF).

    Args:
      source: path of a ``tokenizer.json``, or a ``tokenizers.Tokenizer``.
      eos_token_id: the end-of-sequence id (generation stops there), or None.
      bos_token_id: the beginning-of-sequence id, or None (templates may write it).
      chat_template: Jinja2 source; None: ``CHATML_TEMPLATE``.
    """

    def __init__(
        self,
        source,
        eos_token_id: int | None = None,
        *,
        bos_token_id: int | None = None,
        chat_template: str | None = None,
    ):
        from tokenizers import Tokenizer

        if isinstance(source, str | pathlib.Path):
            source = Tokenizer.from_file(str(source))
        if not isinstance(source, Tokenizer):
            raise TypeError(
                f"source must be a tokenizer.json path or a tokenizers.Tokenizer, got {source!r}"
            )
        self._tokenizer = source
        self.vocab_size = source.get_vocab_size()
        for name, value in (("eos_token_id", eos_token_id), ("bos_token_id", bos_token_id)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} outside the vocabulary [0, {self.vocab_size})")
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template

    @property
    def backend(self):
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tokenizer

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else self._tokenizer.id_to_token(token_id) or ""

    @property
    def eos_token(self) -> str:
        return self._token(self.eos_token_id)

    @property
    def bos_token(self) -> str:
        return self._token(self.bos_token_id)

    def encode(self, text: str) -> list[int]:
        """Special tokens written in ``text`` (``<|im_start|>``) become their ids."""
        return self._tokenizer.encode(text).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping], add_generation_prompt: bool = True
    ) -> str:
        """``messages`` rendered with this tokenizer's template (ChatML if it has none)."""
        return _chat.render(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def save(self, directory: str | pathlib.Path) -> None:
        """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (template, bos, eos),
        which ``load_tokenizer(directory)`` reads back."""
        directory = pathlib.Path(directory)
        self._tokenizer.save(str(directory / "tokenizer.json"))
        config = {"bos_token": self.bos_token or None, "eos_token": self.eos_token or None}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _eos_from(directory: pathlib.Path) -> int | None:
    """The end-of-sequence id from ``generation_config.json`` or ``config.json``."""
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            if isinstance(eos, int):
                return eos
    return None


def _token_name(value) -> str | None:
    """``"</s>"`` or ``{"content": "</s>", ...}`` (an AddedToken) -> ``"</s>"``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_from(config: dict) -> str | None:
    """``chat_template``: a string, or a list of ``{"name", "template"}`` (the default)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _hf_directory_tokenizer(directory: pathlib.Path) -> HFTokenizer:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}

    def token_id(key: str) -> int | None:
        name = _token_name(config.get(key))
        return backend.token_to_id(name) if name else None

    eos = _eos_from(directory)
    return HFTokenizer(
        backend,
        eos if eos is not None else token_id("eos_token"),
        bos_token_id=token_id("bos_token"),
        chat_template=_template_from(config),
    )


def load_tokenizer(path: str | pathlib.Path | None):
    """The tokenizer of a checkpoint.

    Args:
      path: a ``.gguf`` file (its ``tokenizer.ggml.*`` metadata), a directory (its
        ``tokenizer.json`` and ``tokenizer_config.json``), or None.

    Returns:
      ``HFTokenizer`` for a GGUF file or a directory with ``tokenizer.json``, else
      ``ByteTokenizer``.
    """
    if path is not None:
        path = pathlib.Path(path)
        if path.is_file() and path.suffix == ".gguf":
            from capibara.core.gguf import GGUFFile

            return tokenizer_from_gguf(GGUFFile(path))
        if (path / "tokenizer.json").exists():
            return _hf_directory_tokenizer(path)
    return ByteTokenizer()


# Pre-tokenizer regexes of llama.cpp's BPE "pre" types (llama-vocab.cpp), applied before
# the byte-level mapping. "smollm" (like starcoder) first splits every digit alone.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_SPLITS = {
    "default": (False, _GPT2),
    "gpt2": (False, _GPT2),
    "smollm": (True, _GPT2),
    "starcoder": (True, _GPT2),
    "llama-bpe": (False, _LLAMA3),
    "llama3": (False, _LLAMA3),
    "qwen2": (False, _QWEN2),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types (tokenizer.ggml.token_type)


def tokenizer_from_gguf(f) -> HFTokenizer:
    """The tokenizer a GGUF file describes, as a byte-level BPE ``tokenizers.Tokenizer``.

    Args:
      f: a ``capibara.core.gguf.GGUFFile``.

    Control tokens (``<|im_start|>``) are special: matched in the text before BPE and
    skipped by ``decode``. ``tokenizer.ggml.pre`` picks the pre-split (see
    ``_PRE_SPLITS``): ``smollm`` splits every digit, then applies GPT-2's regex.

    Raises:
      ValueError: a tokenizer model other than ``gpt2`` (byte-level BPE), or an
        unknown pre-tokenizer, naming it.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = f.field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{f.path.name}: tokenizer.ggml.model={kind!r} is not supported (only 'gpt2', "
            "byte-level BPE)"
        )
    pre = f.field("tokenizer.ggml.pre", "default")
    if pre not in _PRE_SPLITS:
        raise ValueError(
            f"{f.path.name}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
            f"{sorted(_PRE_SPLITS)}"
        )
    tokens = f.field("tokenizer.ggml.tokens")
    types = f.field("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in f.field("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    digits, regex = _PRE_SPLITS[pre]
    splits = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    splits += [
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
    backend.pre_tokenizer = pre_tokenizers.Sequence(splits)
    backend.decoder = decoders.ByteLevel()
    # Added in id order: tokenizers keeps the ids they already have in the vocab.
    backend.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t == _CONTROL
        ]
    )
    backend.add_tokens(
        [AddedToken(tokens[i], normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED]
    )
    return HFTokenizer(
        backend,
        f.field("tokenizer.ggml.eos_token_id"),
        bos_token_id=f.field("tokenizer.ggml.bos_token_id"),
        chat_template=f.field("tokenizer.chat_template"),
    )


class IncrementalDecoder:
    """Text deltas of a growing id list; holds back an unfinished UTF-8 character and
    the tail that could still become one of ``stop`` (so a stop string is never
    streamed)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = stop
        self.ids: list[int] = []
        self.text = ""  # decoded so far (up to a stop string)
        self._emitted = 0
        self.stopped = False

    def push(self, token_id: int | None) -> str:
        """Adds a token (``None``: none, just flush) and returns the new text to show."""
        if token_id is not None:
            self.ids.append(token_id)
        text = self._tokenizer.decode(self.ids)
        hold = 1 if text.endswith("\ufffd") else 0  # maybe a partial character
        for s in self._stop:
            at = text.find(s)
            if at >= 0:
                text, hold, self.stopped = text[:at], 0, True
        if not self.stopped:
            hold = max(hold, _partial_stop(text, self._stop))
        self.text = text
        end = max(self._emitted, len(text) - hold)
        delta, self._emitted = text[self._emitted : end], end
        return delta

    def flush(self) -> str:
        """The held-back tail, at the end of the request."""
        delta, self._emitted = self.text[self._emitted :], len(self.text)
        return delta


def _partial_stop(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
