"""Chat messages -> one prompt string, through the model's chat template.

A tokenizer with ``apply_chat_template(messages, add_generation_prompt=True) -> str``
(every tokenizer of ``capibara.core.inference.tokenizer`` once the real-model work
lands) renders its own template. Otherwise the messages are rendered as ChatML, the
format of SmolLM2-Instruct and Qwen, and ``<|im_end|>`` becomes a stop string so an
assistant turn ends where the format says even with a byte-level tokenizer.
"""

from __future__ import annotations

IM_END = "<|im_end|>"


def chatml(messages: list[dict[str, str]]) -> str:
    """``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then the assistant's
    opening ``<|im_start|>assistant\\n``."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def render(tokenizer, messages: list[dict[str, str]]) -> tuple[str, tuple[str, ...]]:
    """``(prompt, extra stop strings)`` for ``messages`` (``[{"role", "content"}]``)."""
    apply = getattr(tokenizer, "apply_chat_template", None)
    if apply is not None:
        return apply(messages, add_generation_prompt=True), ()
    return chatml(messages), (IM_END,)
