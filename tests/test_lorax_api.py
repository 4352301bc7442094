"""LoRAX's and TGI's /generate bodies as the completions they describe (jaxlora.server.lorax),
without a server."""

import json

import pytest

from jaxlora.errors import RequestError
from jaxlora.server import lorax

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def completion(**parameters):
    body = lorax.GenerateRequest.model_validate({"inputs": "Hi", "parameters": parameters})
    return lorax.completion_body(body, "base")


def test_tgi_grammar_takes_a_json_schema_as_an_object_or_as_its_text():
    """TGI's grammar {"type": "json", "value": ...} takes the schema as an object or as its
    JSON text (TGI parses a string value; huggingface_hub documents the value as "a string
    that represents a JSON Schema"): both constrain the output to it. Other values, and a
    regex that is no string, are refused naming parameters.grammar.value (422)."""
    for value in (SCHEMA, json.dumps(SCHEMA)):
        for kind in ("json", "json_object"):
            constraint = completion(grammar={"type": kind, "value": value}).structured_outputs
            assert constraint.json_ == SCHEMA, (kind, value)
    assert completion(grammar={"type": "regex", "value": "[0-9]+"}).structured_outputs.regex == (
        "[0-9]+"
    )
    for grammar in (
        {"type": "json", "value": "{not json"},
        {"type": "json", "value": "[1, 2]"},
        {"type": "regex", "value": SCHEMA},
    ):
        with pytest.raises(RequestError) as raised:
            completion(grammar=grammar)
        assert raised.value.param == "parameters.grammar.value", grammar
