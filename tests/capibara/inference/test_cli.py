"""The ``capibara`` CLI: ``generate`` streams the engine's greedy text, ``bench-serve``
prints the metrics."""

from __future__ import annotations

from engine_helpers import reference_greedy
from flax import nnx

from capibara import cli
from capibara.core.config import preset
from capibara.core.inference import ByteTokenizer
from capibara.core.model import CapibaraModel

ARGS = ["--max-tokens", "6", "--slots", "2", "--page-size", "8", "--prefill-chunk", "16"]


def test_generate_streams_the_greedy_text(tmp_path, capsys):
    model = CapibaraModel(preset("tiny", implementation="xla"), rngs=nnx.Rngs(3))
    model.save_pretrained(tmp_path)
    code = cli.main(
        ["generate", "Hello", "--checkpoint", str(tmp_path), "--max-seq-len", "32", *ARGS]
    )
    out, err = capsys.readouterr()
    want = ByteTokenizer().decode(reference_greedy(model, list(b"Hello"), 6))
    assert code == 0 and out == want + "\n"
    assert "6 tokens" in err


def test_generate_rejects_an_over_long_request(capsys):
    code = cli.main(["generate", "x" * 40, "--max-seq-len", "32", *ARGS])
    assert code == 2 and "max_seq_len" in capsys.readouterr().err


def test_bench_serve_prints_metrics(capsys):
    code = cli.main(["bench-serve", "--requests", "5", "--prompt-len", "10", "--prometheus", *ARGS])
    out, _ = capsys.readouterr()
    assert code == 0 and "5 requests, 30 tokens" in out
    assert 'capibara_requests_finished_total{reason="length"} 5' in out
