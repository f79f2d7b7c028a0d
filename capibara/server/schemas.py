"""Request bodies of the OpenAI-compatible API (pydantic), and their ``SamplingParams``.

Bodies are validated strictly (``"5"`` is not an int, ``1.5`` is not an int, ``"yes"``
is not a bool), so a wrong type is a 400 naming the field rather than a silent
coercion. Fields OpenAI defines that the engine does not implement are accepted at
their neutral value (``n=1``, no penalties, no ``logprobs``) and refused otherwise;
fields OpenAI does not define are ignored, as vLLM does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from capibara.core.inference import SamplingParams

_STRICT = ConfigDict(strict=True, extra="ignore")
# SamplingParams' seed range: the engine folds it into a 32-bit key.
_Seed = Annotated[int, Field(ge=0, lt=2**32)]
_Ids = Annotated[list[int], Field(min_length=1)]
_One = Field(min_length=1, max_length=1)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False  # a last chunk with ``usage`` and no choices


class _Sampling(BaseModel):
    """The sampling fields shared by completions and chat completions."""

    model_config = _STRICT

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # None: see each endpoint
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None  # None: 1, as OpenAI
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off (vLLM uses -1)
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: _Seed | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=8)] | None = (
        None
    )
    n: Literal[1] | None = None  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks)

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, str) and not value:
            raise ValueError("stop strings must not be empty")
        return value

    def sampling(
        self, max_tokens: int, extra_stop: tuple[str, ...] = (), defaults: dict | None = None
    ) -> SamplingParams:
        """The engine's parameters. ``max_tokens`` is the endpoint's resolved value;
        ``defaults`` (``temperature``, ``top_k``, ``top_p``) fill the fields the request
        omits, else OpenAI's defaults (temperature 1, no filters)."""
        d = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **(defaults or {})}

        def pick(name):
            value = getattr(self, name)
            return d[name] if value is None else value

        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick("temperature"),
            top_k=max(pick("top_k"), 0),  # -1 (vLLM's "off") is 0 here
            top_p=pick("top_p"),
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=stop + tuple(s for s in extra_stop if s not in stop),
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a string or token ids (or a list of one
    of them: batched prompts are not served, ``n`` is 1)."""

    prompt: str | _Ids | Annotated[list[str], _One] | Annotated[list[_Ids], _One]
    echo: Literal[False] | None = None
    logprobs: None = None  # not served
    suffix: None = None

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            return p[0]
        return p


class ContentPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: ``messages`` rendered by the chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name
    logprobs: Literal[False] | None = None  # not served
    tools: None = None  # not served

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
