"""Tokenizers: a Hugging Face ``tokenizer.json`` when there is one, raw UTF-8 bytes otherwise.

Both offer ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size`` and
``eos_token_id`` (``None`` if there is none). ``IncrementalDecoder`` turns a stream of
ids into text deltas without splitting a multi-byte character.
"""

from __future__ import annotations

import json
import pathlib


class ByteTokenizer:
    """Token ``i`` is the byte ``i``: works with no files (vocab 256, no end token)."""

    vocab_size = 256
    eos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` read from ``tokenizer.json``."""

    def __init__(self, path: str | pathlib.Path, eos_token_id: int | None = None):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


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


def load_tokenizer(directory: str | pathlib.Path | None):
    """``HFTokenizer`` if ``directory/tokenizer.json`` exists, else ``ByteTokenizer``."""
    if directory is not None:
        directory = pathlib.Path(directory)
        if (directory / "tokenizer.json").exists():
            return HFTokenizer(directory / "tokenizer.json", _eos_from(directory))
    return ByteTokenizer()


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
