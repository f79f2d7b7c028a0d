"""``capibara chat``: one user turn per stdin line, answers streamed, the conversation
kept in the prompt; ``/reset`` clears it. Run on ``--random-tiny`` (no files)."""

from __future__ import annotations

import io

from capibara import cli
from capibara.core.inference import ByteTokenizer

ARGS = ["--random-tiny", "--max-tokens", "4", "--page-size", "8", "--prefill-chunk", "16"]


def test_chat_keeps_the_conversation_and_resets(monkeypatch, capsys):
    prompts = []
    render = ByteTokenizer.apply_chat_template

    def spy(self, messages, add_generation_prompt=True):  # records, then renders for real
        prompts.append([dict(m) for m in messages])
        return render(self, messages, add_generation_prompt)

    monkeypatch.setattr(ByteTokenizer, "apply_chat_template", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n/reset\nFresh\n/exit\nnot read\n"))
    code = cli.main(["chat", "--system", "Be brief.", "--max-seq-len", "256", *ARGS])
    err = capsys.readouterr().err
    assert code == 0 and err.count("[4 tokens") == 3
    assert [[m["role"] for m in p] for p in prompts] == [
        ["system", "user"],
        ["system", "user", "assistant", "user"],  # the first answer is kept
        ["system", "user"],  # after /reset
    ]
    assert prompts[2][1]["content"] == "Fresh"


def test_chat_template_fallback_is_chatml():
    text = ByteTokenizer().apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    text = ByteTokenizer().apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
