"""Every Pallas kernel lowers for its target platform from this CPU host (``make lower``)."""

from __future__ import annotations

import pytest

from capibara.kernels import lowering


@pytest.mark.parametrize("case", lowering.all_cases(), ids=lambda c: c.name)
def test_kernel_exports_for_its_platform(case):
    text = lowering.lower(case)
    assert case.custom_call in text


def test_every_op_module_has_cases():
    names = {case.name.split(".")[0] for case in lowering.all_cases()}
    assert {m.rsplit(".", 1)[-1] for m in lowering.OP_MODULES} <= names
