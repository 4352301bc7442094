"""scripts/generate.py's library side: demo adapters answer differently, in one batch."""

from jaxlora.generate import run_generate


def demo_run(**kwargs):
    """run_generate on the tiny model and its demo adapters, greedy, 12 tokens."""
    defaults = {"adapters": [], "prompts": ["Who are you?"], "max_tokens": 12, "seed": 0}
    return run_generate(model="tiny", temperature=0.0, **{**defaults, **kwargs})


def test_demo_generation_routes_every_prompt_to_its_adapter():
    lines = []
    results = demo_run(out=lines.append)
    by_adapter = {r.adapter: r.text for r in results}
    assert set(by_adapter) == {None, "pirate", "robot", "poet"}
    assert by_adapter["pirate"].startswith(" Arr")
    assert by_adapter["robot"].startswith(" BEEP")
    assert len(set(by_adapter.values())) == 4
    assert "in one batch" in lines[-1] and "step shapes included" in lines[-1]


def test_generation_under_a_constraint_flag(tmp_path):
    """--choice, --regex and --json_schema (@file) constrain every adapter's answers; two of
    them at once, or an unreadable schema file, are refused naming the flags."""
    import json
    import re

    import pytest

    from jaxlora.errors import ConfigError
    from jaxlora.generate import structured_output_flags

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"enum": ["red", "green", "blue"]}))
    for constraint, valid in (
        (structured_output_flags(choices=["aye", "nay"]), lambda t: t in ("aye", "nay")),
        (
            structured_output_flags(regex="[a-z]{3}[0-9]"),
            lambda t: re.fullmatch("[a-z]{3}[0-9]", t),
        ),
        (
            structured_output_flags(json_schema=f"@{schema}"),
            lambda t: json.loads(t) in ("red", "green", "blue"),
        ),
    ):
        results = demo_run(structured_output=constraint, out=lambda line: None)
        assert len(results) == 4
        for r in results:
            assert r.finish_reason == "stop" and valid(r.text), (constraint.kind, r.text)
    with pytest.raises(ConfigError, match="--regex, --choice: expected at most one"):
        structured_output_flags(regex="a", choices=["a"])
    with pytest.raises(ConfigError, match="--json_schema: cannot read"):
        structured_output_flags(json_schema=f"@{tmp_path / 'missing.json'}")


def test_a_model_without_a_tokenizer_takes_token_id_prompts():
    """A checkpoint with no tokenizer.json (the golden fixture's): prompts are token ids
    ("1 2 3" or "[1, 2, 3]"), answers are printed as token ids; text, or no prompt, is a
    one-line error from the script (exit status 2), not a traceback."""
    import os
    import subprocess
    import sys

    import pytest

    from jaxlora.errors import ConfigError

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = os.path.join(repo, "tests", "fixtures", "golden_phi3", "base")
    adapter = os.path.join(repo, "tests", "fixtures", "golden_phi3", "adapters", "r1_qkv")
    lines = []
    results = run_generate(
        model=base,
        adapters=[f"qkv={adapter}"],
        prompts=["1 2 3", "[4, 5]"],
        max_tokens=3,
        temperature=0.0,
        seed=0,
        out=lines.append,
    )
    assert [r.prompt_ids for r in results[::2]] == [[1, 2, 3], [4, 5]]
    assert all(len(r.token_ids) == 3 for r in results)
    assert lines[0].startswith("[base] [1, 2, 3] -> [") and lines[1].startswith("[qkv] [1, 2, 3]")
    with pytest.raises(ConfigError, match="'hello': model .* has no tokenizer.json"):
        run_generate(
            model=base, adapters=[], prompts=["hello"], max_tokens=1, temperature=0.0, seed=0
        )
    run = subprocess.run(
        [sys.executable, os.path.join(repo, "scripts", "generate.py"), f"--model={base}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "error: model " in run.stderr and "give --prompt as token ids" in run.stderr
