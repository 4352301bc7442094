"""Tokenizer: the tiny built-in tokenizer, HF files, streaming detokenisation, chat templates."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from configs.models import TINY
from jaxlora.errors import ConfigError, FormatError, RequestError
from jaxlora.tokenizer import TINY_SPECIAL_TOKENS, Tokenizer, tiny_tokenizer

TEXTS = [
    "Hello, world! The quick brown fox.",
    "Café, naïve, résumé, Ångström, façade",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 in one",
    "日本語のテキストと中文文本，한국어",
    "  leading and trailing spaces \n\ttabs\r\nand newlines  ",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


def test_tiny_tokenizer_shape(tok):
    assert tok.vocab_size <= TINY.vocab_size
    special_ids = [tok.token_to_id(t) for t in TINY_SPECIAL_TOKENS]
    assert special_ids == list(range(len(TINY_SPECIAL_TOKENS)))
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,) and tok.pad_token_id == 0
    # Merged multi-byte tokens exist, so streaming is exercised on more than single bytes.
    assert len(tok.encode("the assistant", add_bos=False)) < len("the assistant")
    assert tiny_tokenizer().backend.to_str() == tok.backend.to_str()  # deterministic


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False) == ids[1:]


def stream(tok, ids, prompt_ids=()):
    decoder = tok.incremental_decoder(prompt_ids)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.finish())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decode_equals_full_decode(tok, text):
    ids = tok.encode(text, add_bos=False)
    pieces = stream(tok, ids)
    assert "".join(pieces) == text
    # No piece ever ends inside a character: an incomplete one is held back, not shown as U+FFFD.
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_decode_of_random_ids_with_specials_and_invalid_bytes(tok):
    """Random ids produce broken UTF-8 and special tokens; the stream still equals the full
    decode, broken bytes as U+FFFD in the same places."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        ids = [int(i) for i in rng.integers(0, tok.vocab_size, rng.integers(1, 40))]
        assert "".join(stream(tok, ids)) == tok.decode(ids)
        assert "".join(stream(tok, ids, prompt_ids=tok.encode("Hi there"))) == tok.decode(ids)


def test_incremental_decode_continues_the_prompt(tok):
    prompt = tok.encode("The answer is")
    generated = tok.encode(" 42, café 😀", add_bos=False)
    full = tok.decode(prompt + generated)
    assert "".join(stream(tok, generated, prompt_ids=prompt)) == full[len(tok.decode(prompt)) :]


def test_default_chat_template(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
        },
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.apply_chat_template(messages)
    assert text == (
        "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\nHello.\n"
        "<|user|>\nBye\n<|assistant|>\n"
    )
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith(
        "<|assistant|>\n"
    )
    ids = tok.encode_chat(messages)
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.token_to_id("<|user|>")) == 2  # role markers are single special tokens
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + text


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty"),
        ("hello", "non-empty"),
        ([{"role": "wizard", "content": "x"}], r"messages\[0\].role"),
        ([{"role": "user", "content": 5}], r"messages\[0\].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "text parts"),
        (["just a string"], r"messages\[0\]"),
    ],
)
def test_bad_messages_raise_request_error(tok, messages, match):
    with pytest.raises(RequestError, match=match):
        tok.apply_chat_template(messages)


def write_hf_dir(tmp_path, tok, **config):
    tok.save(tmp_path)
    if config:
        path = tmp_path / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return tmp_path


def test_saved_tokenizer_loads_back_identically(tok, tmp_path):
    write_hf_dir(tmp_path, tok)
    for source in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = Tokenizer.from_file(source)
        assert loaded.backend.to_str() == tok.backend.to_str()
        assert (loaded.bos_token_id, loaded.eos_token_ids, loaded.pad_token_id) == (
            tok.bos_token_id,
            tok.eos_token_ids,
            tok.pad_token_id,
        )
        for text in TEXTS:
            assert loaded.encode(text) == tok.encode(text)
        assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == (
            tok.apply_chat_template([{"role": "user", "content": "x"}])
        )


def test_hf_config_fields(tok, tmp_path):
    """bos/eos as {"content": ...} objects, add_bos_token false, extra EOS ids in
    generation_config.json: the shapes real HF model directories use."""
    write_hf_dir(
        tmp_path,
        tok,
        bos_token={"content": "<bos>", "lstrip": False},
        eos_token={"content": "<eos>"},
        add_bos_token=False,
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.eos_token_ids == (2, 5) and loaded.eos_token_id == 2
    assert loaded.encode("hi") == tok.encode("hi", add_bos=False)
    loaded.save(tmp_path / "again")
    assert Tokenizer.from_file(tmp_path / "again").eos_token_ids == (2, 5)


def test_jinja_chat_template_from_config(tok, tmp_path):
    pytest.importorskip("jinja2")  # an optional dependency: needed only for HF chat templates
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('system message must come first') }}{% endif %}"
        "[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
    )
    write_hf_dir(tmp_path, tok, chat_template=template)
    loaded = Tokenizer.from_file(tmp_path)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = loaded.apply_chat_template(messages)
    assert text == "<bos>[SYSTEM] S<eos>\n[USER] U<eos>\n[ASSISTANT] "
    assert loaded.encode_chat(messages).count(tok.bos_token_id) == 1  # BOS not doubled
    with pytest.raises(RequestError, match="system message must come first"):
        loaded.apply_chat_template(messages[::-1])


def test_jinja_templates_get_hf_s_extensions_and_tojson(tok):
    """What HF's renderer offers templates: {% break %} / {% continue %} (Qwen3.5-style),
    {% generation %} blocks (rendered as their body) and tojson's ensure_ascii, separators and
    sort_keys (Kimi's tojson(separators=...)); before, a ConfigError on every request."""
    pytest.importorskip("jinja2")
    messages = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    tok.chat_template = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m.role }}{% endfor %}|{% for m in messages %}{% generation %}{{ m.content }}"
        "{% endgeneration %}{% endfor %}|{{ {'b': 'é', 'a': 1} | tojson(separators=(',', ':'), "
        "sort_keys=true) }}|{{ 'é' | tojson(ensure_ascii=true) }}"
    )
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=False)
    finally:
        tok.chat_template = None
    assert text == 'user|UA|{"a":1,"b":"é"}|"\\u00e9"'


def test_malformed_tool_calls_in_messages_are_the_requests_fault(tok):
    """An assistant message's tool_calls that are not OpenAI's objects are a RequestError
    naming the field (they were a ConfigError blaming the server's template: a 500);
    arguments that are not JSON, or past Python's readers, reach the template as text."""
    pytest.importorskip("jinja2")
    tok.chat_template = (
        "{% for m in messages %}{{ m.content }}{% for c in m.tool_calls or [] %}"
        "{{ c.function.arguments | tojson }}{% endfor %}{% endfor %}"
    )

    def render(calls):
        messages = [
            {"role": "user", "content": "U"},
            {"role": "assistant", "content": None, "tool_calls": calls},
        ]
        return tok.apply_chat_template(messages, add_generation_prompt=False)

    try:
        for calls, field in (
            ([{"type": "function", "function": "f"}], "tool_calls[0].function"),
            ([{"type": "function", "function": 5}], "tool_calls[0].function"),
            (["f"], "tool_calls[0]"),
            ("f", "tool_calls"),
        ):
            with pytest.raises(RequestError, match=rf"^messages\[1\]\.{re.escape(field)}: "):
                render(calls)
        huge = '{"x": 1' + "0" * 5000 + "}"
        call = {"type": "function", "function": {"name": "f", "arguments": huge}}
        assert render([call]) == "U" + json.dumps(huge)
        call["function"]["arguments"] = '{"x": 1}'
        assert render([call]) == 'U{"x": 1}'
        # An earlier answer's reasoning reaches templates that render it (Qwen3's).
        tok.chat_template = "{% for m in messages %}{{ m.reasoning_content or '-' }}{% endfor %}"
        messages = [
            {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A", "reasoning_content": "R"},
        ]
        assert tok.apply_chat_template(messages, add_generation_prompt=False) == "-R"
    finally:
        tok.chat_template = None


def test_jinja_template_cannot_reach_python(tok, tmp_path):
    pytest.importorskip("jinja2")
    write_hf_dir(
        tmp_path, tok, chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}"
    )
    with pytest.raises(ConfigError, match="chat_template"):
        Tokenizer.from_file(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    write_hf_dir(tmp_path, tok, chat_template="{% for m in messages %}")
    with pytest.raises(ConfigError, match="not a valid jinja2 template"):
        Tokenizer.from_file(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_files_beside_the_config_win_as_in_transformers(tok, tmp_path):
    """Recent transformers save the template as chat_template.jinja (processors as
    chat_template.json) rather than in tokenizer_config.json: the file wins over the field, the
    .jinja over the .json, and a broken template names the file it came from."""
    pytest.importorskip("jinja2")
    write_hf_dir(tmp_path, tok, chat_template="CONFIG {{ messages[0]['content'] }}")
    user = [{"role": "user", "content": "x"}]
    assert Tokenizer.from_file(tmp_path).apply_chat_template(user) == "CONFIG x"
    (tmp_path / "chat_template.json").write_text(
        json.dumps({"chat_template": "JSON {{ messages[0]['content'] }}"})
    )
    assert Tokenizer.from_file(tmp_path).apply_chat_template(user) == "JSON x"
    jinja = tmp_path / "chat_template.jinja"
    jinja.write_text("JINJA {{ messages[0]['content'] }}{{ eos_token }}")
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.apply_chat_template(user) == "JINJA x<eos>"
    # Saved back, the template travels in tokenizer_config.json.
    loaded.save(tmp_path / "again")
    assert Tokenizer.from_file(tmp_path / "again").apply_chat_template(user) == "JINJA x<eos>"
    jinja.write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match=r"chat_template\.jinja: not a valid jinja2 template"):
        Tokenizer.from_file(tmp_path).apply_chat_template(user)
    jinja.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(FormatError, match=r"chat_template\.jinja: cannot read the file"):
        Tokenizer.from_file(tmp_path)
    jinja.unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(FormatError, match=r"chat_template\.json: field 'chat_template' must be"):
        Tokenizer.from_file(tmp_path)


def test_set_chat_template_checks_it_at_once(tok):
    pytest.importorskip("jinja2")
    own = Tokenizer(tok.backend, bos_token="<bos>", eos_tokens=("<eos>",), source="mine")
    own.set_chat_template("<<{{ messages[-1]['content'] }}>>", "--chat_template")
    assert own.apply_chat_template([{"role": "user", "content": "hi"}]) == "<<hi>>"
    with pytest.raises(ConfigError, match="^--chat_template: not a valid jinja2 template"):
        own.set_chat_template("{% if %}", "--chat_template")
    assert own.chat_template == "<<{{ messages[-1]['content'] }}>>"  # unchanged
    own.set_chat_template("{{ raise_exception('no') }}", "--chat_template=t.jinja")
    with pytest.raises(RequestError, match=r"^chat template \(--chat_template=t.jinja\): no"):
        own.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_or_corrupt_files_raise_format_error(tok, tmp_path):
    with pytest.raises(FormatError, match="nowhere.*file not found"):
        Tokenizer.from_file(tmp_path / "nowhere")
    with pytest.raises(FormatError, match="empty_dir.*tokenizer.json.*file not found"):
        (tmp_path / "empty_dir").mkdir()
        Tokenizer.from_file(tmp_path / "empty_dir")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3')
    with pytest.raises(FormatError, match=r"bad/tokenizer.json.*not a valid"):
        Tokenizer.from_file(bad)
    (bad / "tokenizer.json").write_bytes(b"\x00\xff garbage")
    with pytest.raises(FormatError, match=r"bad/tokenizer.json"):
        Tokenizer.from_file(bad / "tokenizer.json")

    good = write_hf_dir(tmp_path / "good", tok)
    (good / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(FormatError, match="tokenizer_config.json"):
        Tokenizer.from_file(good)
    write_hf_dir(good, tok, eos_token="<not-a-token>")
    with pytest.raises(FormatError, match="eos_token '<not-a-token>'"):
        Tokenizer.from_file(good)
    write_hf_dir(good, tok, eos_token=7)
    with pytest.raises(FormatError, match="'eos_token'"):
        Tokenizer.from_file(good)
    write_hf_dir(good, tok)
    (good / "generation_config.json").write_text(json.dumps({"eos_token_id": 99999}))
    with pytest.raises(FormatError, match="generation_config.json.*eos_token_id"):
        Tokenizer.from_file(good)


def test_continue_final_message_ends_the_prompt_inside_that_message(tok):
    """continue_final_message: the prompt ends right after the last message's text (no
    end-of-turn, no generation prompt), as HF's apply_chat_template cuts it; with
    add_generation_prompt left out it is not added, given true it is refused."""
    messages = [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "The color is "},
    ]
    text = tok.apply_chat_template(messages, continue_final_message=True)
    assert text == "<|user|>\nName a color.\n<|assistant|>\nThe color is "
    assert text == tok.apply_chat_template(
        messages, continue_final_message=True, add_generation_prompt=False
    )
    ids = tok.encode_chat(messages, continue_final_message=True)
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + text
    with pytest.raises(RequestError, match="^continue_final_message: .*add_generation_prompt"):
        tok.apply_chat_template(messages, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(RequestError, match=r"^messages\[1\].content: .*empty"):
        tok.apply_chat_template(
            [*messages[:1], {"role": "assistant", "content": " "}], continue_final_message=True
        )


def test_continue_final_message_and_template_kwargs_with_a_jinja_template(tok, tmp_path):
    """A template that strips contents and reads a variable of the request's
    (chat_template_kwargs): the cut keeps the message's leading text as rendered; a variable
    the server sets itself is refused; one that breaks the template is the request's fault."""
    pytest.importorskip("jinja2")
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | trim }}<eos>\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% if think %} <think>{% endif %} "
        "{% endif %}"
    )
    loaded = Tokenizer.from_file(write_hf_dir(tmp_path, tok, chat_template=template))
    user = [{"role": "user", "content": "Hi"}]
    assert loaded.apply_chat_template(user) == "[user] Hi<eos>\n[assistant] "
    assert loaded.apply_chat_template(user, template_kwargs={"think": True}) == (
        "[user] Hi<eos>\n[assistant] <think> "
    )
    prefilled = [*user, {"role": "assistant", "content": "  Well, "}]
    assert loaded.apply_chat_template(prefilled, continue_final_message=True) == (
        "[user] Hi<eos>\n[assistant] Well,"
    )
    with pytest.raises(RequestError, match=r"^chat_template_kwargs.messages: .*sets"):
        loaded.apply_chat_template(user, template_kwargs={"messages": []})
    broken = Tokenizer.from_file(
        write_hf_dir(tmp_path / "b", tok, chat_template="{{ messages[0]['content'] ~ n.x.y }}")
    )
    with pytest.raises(RequestError, match=r"^chat_template_kwargs: .*failed to render"):
        broken.apply_chat_template(user, template_kwargs={"n": 1})
    with pytest.raises(ConfigError, match="chat_template"):  # (no request variable: its own)
        broken.apply_chat_template(user)
    missing = Tokenizer.from_file(
        write_hf_dir(tmp_path / "m", tok, chat_template="{{ 'fixed prompt' }}")
    )
    with pytest.raises(RequestError, match=r"^messages\[0\].content: .*does not write"):
        missing.apply_chat_template(user, continue_final_message=True)


def test_the_chat_template_flag(tmp_path):
    """--chat_template (LaunchConfig.chat_template, vLLM's --chat-template): a file holding a
    template or the template itself replaces the base model's; anything else, a model without a
    tokenizer, or a template jinja2 cannot parse is a ConfigError naming the flag."""
    pytest.importorskip("jinja2")
    from absl import flags

    from jaxlora import launch_flags
    from jaxlora.server.launch import LaunchConfig, apply_chat_template_flag, build_state

    user = [{"role": "user", "content": "hi"}]
    path = tmp_path / "t.jinja"
    path.write_text("FILE {{ messages[0]['content'] }}")
    own = tiny_tokenizer()
    apply_chat_template_flag(own, str(path))
    assert own.apply_chat_template(user) == "FILE hi"
    assert own.chat_template_source == f"--chat_template={path}"
    apply_chat_template_flag(own, "INLINE {{ messages[0]['content'] }}")
    assert own.apply_chat_template(user) == "INLINE hi"
    with pytest.raises(ConfigError, match=r"--chat_template='nope.jinja': neither a file nor"):
        apply_chat_template_flag(own, "nope.jinja")
    with pytest.raises(ConfigError, match="^--chat_template: not a valid jinja2 template"):
        apply_chat_template_flag(own, "{% for m in messages %}")
    with pytest.raises(ConfigError, match="--chat_template: the model has no tokenizer"):
        apply_chat_template_flag(None, str(path))
    try:
        flags.FLAGS(["serve.py", f"--chat_template={path}", "--trust_request_chat_template"])
        launch = launch_flags.launch_config()
    finally:
        flags.FLAGS.unparse_flags()
    assert launch.chat_template == str(path) and launch.trust_request_chat_template
    state = build_state(
        LaunchConfig(
            chat_template=str(path), trust_request_chat_template=True, max_batch=2, kv_pages=64
        )
    )
    try:  # the embedded demo model, its own template replaced
        assert state.llm.tokenizer.apply_chat_template(user) == "FILE hi"
        assert state.config.trust_request_chat_template
    finally:
        state.llm.stop()
