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
