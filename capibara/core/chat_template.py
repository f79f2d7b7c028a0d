"""Chat templates: a conversation (``[{"role": ..., "content": ...}]``) -> the prompt text.

A checkpoint's template is Jinja2 source (GGUF ``tokenizer.chat_template``, Hugging Face
``tokenizer_config.json``'s ``chat_template``). It is rendered the way transformers
renders it (``apply_chat_template``), so the same conversation gives the same text:
a sandboxed environment with ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols``
extension, a ``tojson`` filter and a ``raise_exception`` global, and the variables
``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``.

A tokenizer without a template (the byte tokenizer, a ``tokenizer.json`` with no
config) uses ``CHATML_TEMPLATE``, plain ChatML with no default system prompt:

    <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence

# ChatML, the fallback: each message on its own turn, then the assistant's opening.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: unlike Jinja's own, it does not HTML-escape.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """The compiled template (cached: a server renders the same one per request)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _check_messages(messages: Sequence[Mapping]) -> list[dict]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        out.append(dict(m))
    return out


def render(
    template: str | None,
    messages: Sequence[Mapping],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra,
) -> str:
    """Renders ``messages`` with ``template`` (``None``: ``CHATML_TEMPLATE``).

    Args:
      template: Jinja2 source, e.g. the GGUF file's ``tokenizer.chat_template``.
      messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
      add_generation_prompt: end with the assistant's opening, so the model answers.
      bos_token, eos_token: the tokenizer's, for templates that write them.
      extra: more template variables (``tools``, ``documents``, ...).

    Raises:
      ValueError: a message that is not a dict with ``role`` and ``content``.
      jinja2.TemplateError: the template's own ``raise_exception`` (e.g. roles that do
        not alternate).
    """
    compiled = _compile(CHATML_TEMPLATE if template is None else template)
    return compiled.render(
        messages=_check_messages(messages),
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        **extra,
    )
