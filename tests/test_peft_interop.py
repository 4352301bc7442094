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
        ("qwen3_sliding", "golden_qwen3_sliding"),
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
    [
        "golden_mistral",
        "golden_qwen2_yarn",
        "golden_qwen3_sliding",
        "golden_gemma",
        "golden_gemma2",
        "golden_gemma3",
    ],
)
def test_the_paged_engine_generates_the_tokens_of_transformers(fixture):
    """Mistral with a 3-key sliding window (golden_mistral), Qwen2 with YaRN RoPE scaling
    (golden_qwen2_yarn), Gemma (golden_gemma) and Gemma 2 (golden_gemma2: sandwich norms, soft
    caps, a 3-key window on its even layers) and Gemma 3 (golden_gemma3: q / k norms, its
    sliding layers' own RoPE base), Qwen3 whose second layer slides over 3 keys
    (golden_qwen3_sliding): the paged engine (a 12-token prefill, then decode steps past the
    windows, fp32) generates transformers' greedy tokens."""
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
        elif fixture == "golden_qwen3_sliding":
            assert (config.local_window, config.max_window_layers) == (3, 1)
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


@pytest.mark.peft
@needs_peft
@pytest.mark.parametrize(
    ("strategy", "density", "majority_sign_method"),
    [("linear", 1.0, "total"), ("ties", 0.3, "total"), ("ties", 0.7, "frequency")],
)
def test_lorax_merges_are_peft_s_merge_utils(tmp_path, strategy, density, majority_sign_method):
    """merge_lora_parameters (LoRAX's per-request merge) gives, tensor by tensor, what PEFT's
    merge_utils (``task_arithmetic``, ``ties``: the code LoRAX's merges are taken from) give
    on the same tensors: three adapters, some modules targeted by two of them only."""
    import numpy as np

    from jaxlora.lora import LoraWeights, merge_lora_parameters

    rng = np.random.default_rng(7)
    modules = {"q_proj": 3, "v_proj": 3, "down_proj": 2}  # module -> adapters targeting it
    parts = []
    for i, weight in enumerate((1.0, -0.6, 0.35)):
        a, b = {}, {}
        for m, count in modules.items():
            if i < count:
                a[m] = rng.normal(0, 1, (2, 4, 24)).astype(np.float32)
                b[m] = rng.normal(0, 1, (2, 4, 16)).astype(np.float32)
        parts.append((LoraWeights(name=f"p{i}", a=a, b=b, scales=dict.fromkeys(a, 2.0)), weight))
    merged = merge_lora_parameters(
        parts,
        "m",
        strategy=strategy,
        density=density,
        majority_sign_method=majority_sign_method,
    )
    arrays = {}
    for m in modules:
        for side in ("a", "b"):
            arrays[f"{m}.{side}.merged"] = getattr(merged, side)[m]
            for i, (w, _) in enumerate(parts):
                if m in w.a:
                    arrays[f"{m}.{side}.{i}"] = getattr(w, side)[m]
    np.savez(tmp_path / "merge.npz", **arrays)
    script = (
        "import json, sys, numpy as np, torch\n"
        "from peft.utils import merge_utils\n"
        "data = np.load(sys.argv[1]); weights = json.loads(sys.argv[2])\n"
        "strategy, density, method = sys.argv[3], float(sys.argv[4]), sys.argv[5]\n"
        "worst, compared = 0.0, 0\n"
        "for key in [k for k in data.files if k.endswith('.merged')]:\n"
        "    prefix = key[: -len('merged')]\n"
        "    idx = sorted(int(k[len(prefix):]) for k in data.files"
        " if k.startswith(prefix) and k != key)\n"
        "    w = torch.tensor([weights[i] for i in idx])\n"
        "    for layer in range(data[key].shape[0]):\n"
        "        ts = [torch.from_numpy(data[prefix + str(i)][layer]) for i in idx]\n"
        "        if strategy == 'linear':\n"
        "            out = merge_utils.task_arithmetic(ts, w)\n"
        "        else:\n"
        "            out = merge_utils.ties(ts, w, density, method)\n"
        "        err = float((out - torch.from_numpy(data[key][layer])).abs().max())\n"
        "        worst, compared = max(worst, err), compared + 1\n"
        "print(json.dumps([worst, compared]))\n"
    )
    run = subprocess.run(
        [
            peft_python(),
            "-c",
            script,
            str(tmp_path / "merge.npz"),
            json.dumps([w for _, w in parts]),
            strategy,
            str(density),
            majority_sign_method,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    worst, compared = json.loads(run.stdout.strip().splitlines()[-1])
    assert compared == len(modules) * 2 * 2  # (every module's A and B, each layer)
    assert worst < 1e-5
