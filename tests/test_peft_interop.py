"""PEFT itself loads jaxlora's export and computes the same function (issue: "export in PEFT
format that the server and PEFT itself load"). Needs an interpreter with torch, transformers and
peft: this one, or the one named by $JAXLORA_PEFT_PYTHON; CI has neither, the GPU machine has
both (`python3 -m pytest -m peft tests/test_peft_interop.py`)."""

import importlib.util
import os
import sys

import pytest

from jaxlora.formats.peft_interop import check_peft_export

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# A tiny model of each family, as transformers saved it (tests/test_golden.py's fixtures).
GOLDEN_BASES = {
    family: os.path.join(FIXTURES, directory, "base")
    for family, directory in (
        ("llama", "golden"),
        ("qwen2", "golden_qwen2"),
        ("qwen3", "golden_qwen3"),
        ("phi3", "golden_phi3"),
    )
}


def peft_python() -> str | None:
    given = os.environ.get("JAXLORA_PEFT_PYTHON")
    if given:
        return given
    if all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft")):
        return sys.executable
    return None


@pytest.mark.peft
@pytest.mark.skipif(
    peft_python() is None,
    reason="no interpreter with torch + transformers + peft (set JAXLORA_PEFT_PYTHON)",
)
@pytest.mark.parametrize("family", sorted(GOLDEN_BASES))
def test_peft_loads_the_export_and_computes_the_same_logits(tmp_path, family):
    result = check_peft_export(GOLDEN_BASES[family], str(tmp_path), peft_python=peft_python())
    assert result["adapter_effect"] > 1e-2  # the adapter changes the logits ...
    assert result["relative_error"] < 1e-4, result  # ... exactly as PEFT applies it
