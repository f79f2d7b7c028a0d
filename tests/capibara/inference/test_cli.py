"""The ``capibara`` CLI: ``generate`` streams the engine's greedy text, ``bench-serve``
prints the metrics; ``--help`` shows every default, and bad input is one error line
(checked through the installed console script, in a fresh process)."""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys

import pytest
from engine_helpers import reference_greedy
from flax import nnx

from capibara import cli
from capibara.core.config import preset
from capibara.core.inference import ByteTokenizer
from capibara.core.model import CapibaraModel

ARGS = [
    "--max-tokens",
    "6",
    "--slots",
    "2",
    "--page-size",
    "8",
    "--prefill-chunk",
    "16",
    "--random-tiny",
]


def test_generate_streams_the_greedy_text(tmp_path, capsys):
    model = CapibaraModel(preset("tiny", implementation="xla"), rngs=nnx.Rngs(3))
    model.save_pretrained(tmp_path)
    code = cli.main(
        ["generate", "Hello", "--checkpoint", str(tmp_path), "--max-seq-len", "32", *ARGS[:-1]]
    )
    out, err = capsys.readouterr()
    want = ByteTokenizer().decode(reference_greedy(model, list(b"Hello"), 6))
    assert code == 0 and out == want + "\n"
    assert "6 tokens" in err


def test_generate_rejects_an_over_long_request(capsys):
    code = cli.main(["generate", "x" * 40, "--max-seq-len", "32", *ARGS])
    assert code == 2 and "max_seq_len" in capsys.readouterr().err


def test_generate_rejects_a_request_past_the_context(capsys):
    # The prompt fits, the tokens asked for do not: the message says how many would.
    code = cli.main(["generate", "x" * 20, "--max-seq-len", "32", *ARGS[:1], "20", *ARGS[2:]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "prompt of 20 tokens + max_tokens=20 exceeds the maximum context of 32" in err
    assert "at most max_tokens=12 fits" in err


def test_bench_serve_prints_metrics(capsys):
    code = cli.main(["bench-serve", "--requests", "5", "--prompt-len", "10", "--prometheus", *ARGS])
    out, _ = capsys.readouterr()
    assert code == 0 and "5 requests, 30 tokens" in out
    assert 'capibara_requests_finished_total{reason="length"} 5' in out


# -- the real console entry, in a fresh process -----------------------------------------

REPO = pathlib.Path(__file__).resolve().parents[3]
_SCRIPT = pathlib.Path(sys.executable).with_name("capibara")  # [project.scripts] capibara
# The installed console script; `python -m capibara.cli` runs the same main() where the
# package is used from a checkout without being installed.
ENTRY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "capibara.cli"]


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ENTRY, *argv], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )


def _parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """The top-level parser and every subcommand's, by the argv that reaches them."""
    parser = cli._parser()
    parsers = {(): parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers.update({(name,): p for name, p in action.choices.items()})
    return parsers


def _option_blocks(help_text: str) -> dict[str, str]:
    """Each option's entry of a ``--help`` text, by its first option string, with the
    line wrapping undone (an entry starts at a line indented by two spaces and a dash)."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (-[^\s,]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current is not None and line.startswith(" " * 4):
            blocks[current] += " " + line
        else:
            current = None
    return {name: " ".join(block.split()) for name, block in blocks.items()}


@pytest.mark.parametrize(
    "argv", list(_parsers()), ids=lambda a: " ".join(("capibara", *a, "--help"))
)
def test_help_shows_every_option_with_its_default(argv):
    parser = _parsers()[argv]
    proc = _run(*argv, "--help")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    blocks = _option_blocks(proc.stdout)
    options = [
        a for a in parser._actions if a.option_strings and a.default is not argparse.SUPPRESS
    ]
    if argv == ():  # the top level lists every command instead
        assert all(name in proc.stdout for name in ("generate", "bench-serve"))
    else:
        assert {"--checkpoint", "--max-tokens", "--temperature"} <= {
            a.option_strings[0] for a in options
        }
    for action in options:
        name = action.option_strings[0]
        assert name in blocks, f"{name} missing from:\n{proc.stdout}"
        if "(default:" in (action.help or ""):  # a default that says more than None
            shown = " ".join(action.help[action.help.index("(default:") :].split())
        else:
            shown = f"(default: {action.default})"
        assert shown in blocks[name], f"{name}: {shown!r} not in {blocks[name]!r}"


def test_missing_checkpoint_is_one_line_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    proc = _run("generate", "Hello", "--checkpoint", str(missing))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"capibara: error: checkpoint directory {missing} does not exist"
    ]
    assert proc.stdout == ""


def test_over_long_prompt_is_one_line_naming_the_limit():
    proc = _run("generate", "x" * 40, "--max-seq-len", "32", *ARGS)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("capibara: error: prompt of 40 tokens is too long")
    assert "maximum context is 32 tokens" in line and "max_seq_len=32" in line
