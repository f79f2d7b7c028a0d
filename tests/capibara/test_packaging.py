"""The import name: ``capibara.kernels`` is light and lives beside Hugging Face's ``kernels``.

transformers 5.x depends on Hugging Face's ``kernels`` distribution, a top-level
``kernels`` package. Ours is ``capibara.kernels``; both must import in one process
from the repository root (where a top-level ``kernels/`` of ours used to shadow
theirs) and from any other directory (where theirs used to shadow ours). Each check
runs in a fresh interpreter, so what is already imported here cannot hide a failure.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(code: str, cwd: pathlib.Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_no_top_level_kernels_package_in_the_repository():
    assert not (REPO / "kernels").exists()
    assert (REPO / "capibara" / "kernels" / "__init__.py").exists()


def test_importing_the_kernels_loads_no_flax_model_or_engine():
    loaded = _run(
        """
        import json, sys
        import capibara.kernels
        capibara.kernels.flash_attention, capibara.kernels.grouped_matmul
        heavy = ("flax", "capibara.core", "capibara.sharding", "capibara.sparsity",
                 "transformers", "torch")
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy
                                or m.startswith(heavy))))
        """,
        REPO,
    )
    assert loaded == []


def test_lazy_top_level_names_still_resolve():
    names = _run(
        """
        import json, sys
        import capibara
        before = "flax" in sys.modules
        print(json.dumps({"before": before, "shard": capibara.shard.__module__,
                          "sparsify": capibara.sparsify.__module__,
                          "dir": "make_mesh" in dir(capibara)}))
        """,
        REPO,
    )
    assert names == {
        "before": False,
        "shard": "capibara.sharding",
        "sparsify": "capibara.sparsity",
        "dir": True,
    }


def test_unknown_top_level_name_raises_attribute_error():
    import capibara

    with pytest.raises(AttributeError, match="no_such_name"):
        capibara.no_such_name  # noqa: B018


COEXIST = """
    import json
    import transformers.integrations.hub_kernels  # does `from kernels import CUDAProperties`
    import kernels  # Hugging Face's
    import capibara.kernels
    from kernels import CUDAProperties  # noqa: F401  (theirs, not ours)
    print(json.dumps({
        "theirs": kernels.__file__,
        "ours": capibara.kernels.__file__,
        "ours_has_ops": callable(capibara.kernels.flash_attention),
        "theirs_lacks_ours": not hasattr(kernels, "flash_attention"),
    }))
"""


@pytest.mark.parametrize("where", ["repo-root", "elsewhere"])
def test_hugging_face_kernels_and_ours_coexist(where, tmp_path):
    found = _run(COEXIST, REPO if where == "repo-root" else tmp_path)
    assert "site-packages" in found["theirs"], found
    assert pathlib.Path(found["ours"]).parent.parent.name == "capibara", found
    assert found["ours_has_ops"] and found["theirs_lacks_ours"], found
