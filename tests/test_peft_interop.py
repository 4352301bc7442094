"""PEFT itself loads jaxlora's export and computes the same function (issue: "export in PEFT
format that the server and PEFT itself load"). Needs an interpreter with torch, transformers and
peft: this one, or the one named by $JAXLORA_PEFT_PYTHON; CI has neither, the GPU machine has
both (`python3 -m pytest -m peft tests/test_peft_interop.py`)."""

import importlib.util
import json
import os
import subprocess
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
        ("gemma", "golden_gemma"),
        ("gemma2", "golden_gemma2"),
        ("gemma3", "golden_gemma3"),
    )
}


def peft_python() -> str | None:
    given = os.environ.get("JAXLORA_PEFT_PYTHON")
    if given:
        return given
    if all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft")):
        return sys.executable
    return None


# The peft-marked tests need an interpreter with torch + transformers + peft (CI has none).
needs_peft = pytest.mark.skipif(
    peft_python() is None,
    reason="no interpreter with torch + transformers + peft (set JAXLORA_PEFT_PYTHON)",
)


@pytest.mark.peft
@needs_peft
@pytest.mark.parametrize("family", sorted(GOLDEN_BASES))
def test_peft_loads_the_export_and_computes_the_same_logits(tmp_path, family):
    result = check_peft_export(GOLDEN_BASES[family], str(tmp_path), peft_python=peft_python())
    assert result["adapter_effect"] > 1e-2  # the adapter changes the logits ...
    assert result["relative_error"] < 1e-4, result  # ... exactly as PEFT applies it


def transformers_greedy(base: str, prompt: list[int], tokens: int) -> list[int]:
    """transformers' greedy continuation of ``prompt`` (fp32, eager attention), in the peft
    interpreter."""
    script = (
        "import json, sys, torch, transformers\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32,"
        " attn_implementation='eager')\n"
        "ids = torch.tensor([json.loads(sys.argv[2])])\n"
        "out = m.generate(ids, max_new_tokens=int(sys.argv[3]), do_sample=False)\n"
        "print(json.dumps(out[0, ids.shape[1]:].tolist()))\n"
    )
    run = subprocess.run(
        [peft_python(), "-c", script, base, json.dumps(prompt), str(tokens)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.peft
@needs_peft
@pytest.mark.parametrize(
    "fixture",
    ["golden_mistral", "golden_qwen2_yarn", "golden_gemma", "golden_gemma2", "golden_gemma3"],
)
def test_the_paged_engine_generates_the_tokens_of_transformers(fixture):
    """Mistral with a 3-key sliding window (golden_mistral), Qwen2 with YaRN RoPE scaling
    (golden_qwen2_yarn), Gemma (golden_gemma) and Gemma 2 (golden_gemma2: sandwich norms, soft
    caps, a 3-key window on its even layers) and Gemma 3 (golden_gemma3: q / k norms, its
    sliding layers' own RoPE base): the paged engine (a 12-token prefill, then decode
    steps past the windows, fp32) generates transformers' greedy tokens."""
    import jaxlora
    from jaxlora.sampling import SamplingParams

    base = os.path.join(FIXTURES, fixture, "base")
    prompt = list(range(1, 13))
    new_tokens = 10
    expected = transformers_greedy(base, prompt, new_tokens)
    llm = jaxlora.LLM(base, dtype="float32")
    try:
        config = llm.engine.runner.config
        if fixture == "golden_mistral":
            assert config.attention_window == 3
        elif fixture == "golden_qwen2_yarn":
            assert config.rope_scaling.rope_type == "yarn"
        else:
            assert config.model_type in ("gemma", "gemma2", "gemma3_text")
        sampling = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        (out,) = llm.generate([prompt], sampling=sampling)
    finally:
        llm.stop()
    assert out.token_ids == expected


@pytest.mark.peft
@needs_peft
def test_the_rope_table_is_what_transformers_computes_now(tmp_path):
    """tests/fixtures/rope_hf.json (what tests/test_formats.py checks the RoPE scalings
    against) is what this interpreter's transformers writes."""
    import numpy as np

    out = tmp_path / "rope.json"
    script = os.path.join(os.path.dirname(FIXTURES), "..", "scripts", "make_golden.py")
    subprocess.run([peft_python(), script, "--rope_table", "--out", str(out)], check=True)
    with open(os.path.join(FIXTURES, "rope_hf.json")) as f:
        committed = json.load(f)["cases"]
    fresh = json.loads(out.read_text())["cases"]
    assert sorted(fresh) == sorted(committed)
    for name, entry in fresh.items():
        np.testing.assert_allclose(entry["inv_freq"], committed[name]["inv_freq"], rtol=1e-7)
        assert entry["attention_scaling"] == committed[name]["attention_scaling"]
        assert (
            entry["saved_config"]["rope_parameters"]
            == (committed[name]["saved_config"]["rope_parameters"])
        )
