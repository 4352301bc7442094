"""scripts/generate.py's library side: demo adapters answer differently, in one batch."""

from jaxlora.generate import run_generate


def test_demo_generation_routes_every_prompt_to_its_adapter():
    lines = []
    results = run_generate(
        model="tiny",
        adapters=[],
        prompts=["Who are you?"],
        max_tokens=12,
        temperature=0.0,
        seed=0,
        out=lines.append,
    )
    by_adapter = {r.adapter: r.text for r in results}
    assert set(by_adapter) == {None, "pirate", "robot", "poet"}
    assert by_adapter["pirate"].startswith(" Arr")
    assert by_adapter["robot"].startswith(" BEEP")
    assert len(set(by_adapter.values())) == 4
    assert "in one batch" in lines[-1] and "step shapes included" in lines[-1]
