"""Tokenizer: the tiny built-in tokenizer, HF files, streaming detokenisation, chat templates."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers

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


def stream(tok, ids, prompt_ids=(), skip_special_tokens=True):
    decoder = tok.incremental_decoder(prompt_ids, skip_special_tokens=skip_special_tokens)
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


# Text the streaming tokenizers below learn from, and the pieces their random texts are made of:
# multi-byte characters (2, 3 and 4 bytes, ZWJ sequences, flags) that their tokens split.
_STREAM_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, world!",
    "Café, naïve, résumé, déjà vu, Ångström, façade.",
    "日本語のテキストと中文文本，한국어 텍스트. 你好，世界！",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 🎉 🇫🇷",
    "  spaces\tand\nnewlines  ",
] * 3
_STREAM_PIECES = [
    *("the", " fox", "é", "ï", "中文", "世界", "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "ß", "Ω"),
    *(" ", "  ", "\n", "!", "7", "Z", "ア", "\u00a0", "<tool>", " hi there"),
]


def _byte_level_tokenizer() -> Tokenizer:
    """GPT-2 / Qwen-style: byte-level BPE, with added tokens, special and not."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350,
        show_progress=False,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_STREAM_CORPUS, trainer=trainer)
    backend.add_tokens([AddedToken("<tool>"), AddedToken(" hi there")])
    backend.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    return Tokenizer(backend, bos_token="<s>", eos_tokens=("</s>",))


def _sentencepiece_tokenizer(metaspace: bool) -> Tokenizer:
    """Llama / Mistral-style: BPE with byte fallback (<0xNN> tokens for what the vocabulary
    lacks), "▁" for spaces and the text's first space dropped by the decoder (Llama-2's
    Prepend + Strip, or the newer Metaspace with prepend_scheme "first")."""
    backend = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    if metaspace:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first", split=False)]
        )
    else:
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        backend.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>"],
        limit_alphabet=40,  # (so that byte fallback is common)
    )
    backend.train_from_iterator(_STREAM_CORPUS, trainer=trainer)
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
    backend.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    return Tokenizer(backend, bos_token="<s>", eos_tokens=("</s>",))


def _random_output(tok: Tokenizer, rng) -> list[int]:
    """Ids a model could answer with: random texts of multi-byte pieces, encoded, with
    special tokens between them."""
    specials = [tok.token_to_id(t) for t in ("<s>", "</s>", "<|im_end|>")]
    ids = []
    for _ in range(rng.integers(1, 6)):
        ids += tok.encode("".join(rng.choice(_STREAM_PIECES, rng.integers(1, 8))), add_bos=False)
        if rng.random() < 0.5:
            ids.append(int(rng.choice(specials)))
    return ids


@pytest.mark.parametrize(
    "make",
    [
        _byte_level_tokenizer,
        lambda: _sentencepiece_tokenizer(False),
        lambda: _sentencepiece_tokenizer(True),
    ],
    ids=["byte_level", "llama_sentencepiece", "metaspace"],
)
def test_streaming_equals_full_decode_and_vllm_s_decode_stream(make):
    """Streamed pieces, for byte-level and SentencePiece (byte fallback, leading space)
    tokenizers, special tokens skipped or not: their concatenation is the full decode, no
    piece shows U+FFFD for a character its next tokens complete, and each piece is the one
    tokenizers' DecodeStream (vLLM's fast incremental detokenizer) gives for that token.
    After a prompt, the pieces are the text the output adds to the prompt's (the first
    token's leading space kept)."""
    tok = make()
    rng = np.random.default_rng(0)
    for _ in range(60):
        ids, skip = _random_output(tok, rng), bool(rng.random() < 0.5)
        pieces = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert "\ufffd" not in "".join(pieces)
        reference = tokenizers.decoders.DecodeStream(skip_special_tokens=skip)
        assert pieces[:-1] == [reference.step(tok.backend, i) or "" for i in ids]
        assert pieces[-1] == ""
        prompt = _random_output(tok, rng)
        before = tok.decode(prompt, skip_special_tokens=skip)
        after = tok.decode(prompt + ids, skip_special_tokens=skip)
        assert after.startswith(before)
        assert "".join(stream(tok, ids, prompt, skip_special_tokens=skip)) == after[len(before) :]


@pytest.mark.parametrize(
    "make",
    [tiny_tokenizer, _byte_level_tokenizer, lambda: _sentencepiece_tokenizer(False)],
    ids=["tiny", "byte_level", "llama_sentencepiece"],
)
def test_a_prompt_ending_inside_a_character_is_finished_by_the_output(make):
    """Token ids cut inside a character (a client sending an earlier answer's ids back to be
    continued): the output's tokens finish the character and it is streamed whole, then the
    rest: before, the held U+FFFDs' length was taken for the prompt's text and the character
    and the text after it (with byte fallback, a space and a letter too) were lost."""
    tok = make()
    ids = tok.encode("Hi ж🦀 ok", add_bos=False)
    cuts = [c for c in range(1, len(ids)) if tok.decode(ids[:c]).endswith("\ufffd")]
    assert len(cuts) >= 2  # (the characters are split across tokens)
    for cut in cuts:
        # What follows the prompt's text as decoded: "Hi ", then U+FFFDs for an unfinished
        # character (with byte fallback, for a whole run of byte tokens that is not UTF-8:
        # "ж" and half of "🦀").
        shown = tok.decode(ids[:cut])
        expected = "🦀 ok" if "ж" in shown else "ж🦀 ok"
        pieces = stream(tok, ids[cut:], prompt_ids=ids[:cut])
        assert "".join(pieces) == expected, (cut, pieces)
        assert "\ufffd" not in "".join(pieces)
    # Bytes that no output token finishes stay the prompt's: the output adds only its text.
    broken, ok = tok.encode("Hi 🦀", add_bos=False)[:-1], tok.encode("ok", add_bos=False)
    before, after = tok.decode(broken), tok.decode(broken + ok)
    assert before.endswith("\ufffd") and after.startswith(before)
    assert "".join(stream(tok, ok, broken)) == after[len(before) :]


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
    assert text == (  # (text parts joined with newlines, as vLLM joins them)
        "<|system|>\nBe brief.\n<|user|>\nHi \nthere\n<|assistant|>\nHello.\n"
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
        ([{"role": "user"}], r"^messages\[0\].content: .*only assistant messages"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": None}], r"messages\[1\]"),
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
    with pytest.raises(RequestError, match="chat_template.*SecurityError"):
        Tokenizer.from_file(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_a_model_chat_template_jinja2_cannot_parse_loads_and_refuses_chat_requests(
    tok, tmp_path, caplog
):
    """As vLLM, which parses the template only when a chat request renders it: the model loads
    (its completions need no template, and --chat_template may replace it), with a warning
    naming the template, and each chat request is refused with a RequestError naming it
    (vLLM's 400). It was a ConfigError, answered 500, which clients such as the OpenAI SDK
    retry although it fails the same way every time."""
    pytest.importorskip("jinja2")
    from jaxlora.server.errors import status_of

    write_hf_dir(tmp_path, tok, chat_template="{% for m in messages %}")
    with caplog.at_level(logging.WARNING, logger="jaxlora.tokenizer"):
        loaded = Tokenizer.from_file(tmp_path)
    source = f"{tmp_path / 'tokenizer_config.json'}: field 'chat_template'"
    warnings = [r.getMessage() for r in caplog.records if r.name == "jaxlora.tokenizer"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{source}: not a valid jinja2 template")
    assert loaded.encode("Hello") == tok.encode("Hello")
    user = [{"role": "user", "content": "x"}]
    for _ in range(2):  # (every request: a template that failed to parse is not cached)
        with pytest.raises(RequestError) as info:
            loaded.encode_chat(user)
        assert str(info.value).startswith(f"{source}: not a valid jinja2 template ("), info.value
        assert status_of(info.value)[0] == 400
    loaded.set_chat_template("<{{ messages[0]['content'] }}>", "--chat_template")
    assert loaded.apply_chat_template(user) == "<x>"
    caplog.clear()
    write_hf_dir(tmp_path, tok, chat_template="{{ messages[0]['content'] }}")
    with caplog.at_level(logging.WARNING, logger="jaxlora.tokenizer"):
        Tokenizer.from_file(tmp_path)
    assert not [r for r in caplog.records if r.name == "jaxlora.tokenizer"]


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
    with pytest.raises(RequestError, match=r"chat_template\.jinja: not a valid jinja2 template"):
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
    # (no request variable: the template's own fault, but answered as vLLM does, a 400)
    with pytest.raises(RequestError, match=r"field 'chat_template': the chat template failed"):
        broken.apply_chat_template(user)
    missing = Tokenizer.from_file(
        write_hf_dir(tmp_path / "m", tok, chat_template="{{ 'fixed prompt' }}")
    )
    with pytest.raises(RequestError, match=r"^messages\[0\].content: .*does not write"):
        missing.apply_chat_template(user, continue_final_message=True)


# ChatML's and Llama-3's way of ending a turn, for the continue_final_message cut below.
_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
)


@pytest.mark.parametrize(
    "template, final, expected",
    [  # (expected: transformers 5.17's apply_chat_template(..., continue_final_message=True))
        (_CHATML, "end", "<|im_start|>user\nSay<|im_end|>\n<|im_start|>assistant\nend"),
        (
            _CHATML,
            "The answer is ",
            "<|im_start|>user\nSay<|im_end|>\n<|im_start|>assistant\nThe answer is ",
        ),
        (
            _LLAMA3,
            "d",
            "<bos><|start_header_id|>user<|end_header_id|>\n\nSay<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nd",
        ),
        (
            _LLAMA3,
            " Sure thing  ",
            "<bos><|start_header_id|>user<|end_header_id|>\n\nSay<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nSure thing",
        ),
    ],
)
def test_continue_final_message_cuts_where_the_message_ends(tok, template, final, expected):
    """The prompt ends where the template wrote the end of the final message, as HF cuts it
    (it marks that end with a tag): not after a later copy of the message's text, as a short
    prefill ("end", "d") has in the template's end of turn ("<|im_end|>", "<|eot_id|>")."""
    pytest.importorskip("jinja2")
    messages = [{"role": "user", "content": "Say"}, {"role": "assistant", "content": final}]
    assert tok.apply_chat_template(messages, continue_final_message=True, template=template) == (
        expected
    )


def test_text_parts_are_joined_with_newlines_as_in_vllm(tok):
    """A message's content given as text parts is their texts joined with "\\n" (vLLM's
    chat_utils joins them so for templates that read content as a string), not run together."""
    pytest.importorskip("jinja2")
    parts = [{"type": "text", "text": "First line."}, {"type": "text", "text": "Second"}]
    text = tok.apply_chat_template(
        [{"role": "user", "content": parts}], template="{{ messages[0]['content'] }}"
    )
    assert text == "First line.\nSecond"


def test_truncation_and_padding_saved_in_tokenizer_json_are_not_applied(tok, tmp_path):
    """A tokenizer.json may hold the truncation and padding its last user set (fine-tuning
    scripts save them so); HF's encode does not apply them unless asked, and neither does
    ours: a long prompt is not cut to max_length, a short one not padded."""
    tok.save(tmp_path)
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.enable_truncation(max_length=4)
    backend.enable_padding(length=64, pad_id=tok.pad_token_id, pad_token="<pad>")
    backend.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_file(tmp_path)
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    assert len(loaded.encode(TEXTS[0])) > 4
    assert loaded.encode("hi", add_bos=False) == tok.encode("hi", add_bos=False)
    spec = json.loads(loaded.backend.to_str())  # (what llguidance's token masks read)
    assert spec["truncation"] is None and spec["padding"] is None


def test_bos_as_hf_adds_it_and_templates_always_get_it(tok, tmp_path):
    """Without add_bos_token in tokenizer_config.json, encode puts BOS first where the
    file's post-processor does (Llama's TemplateProcessing), not where it does not (GPT-2-style
    files naming a bos_token, as SmolLM2's does): HF's encode. add_bos_token false (DeepSeek-V3's
    config) stops encode adding it, but the chat template still gets bos_token, as HF gives it."""
    pytest.importorskip("jinja2")
    template = "{{ bos_token }}{{ messages[0]['content'] }}"
    hi = tok.encode("hi", add_bos=False)
    for name, post_processor, config, adds in [
        ("gpt2", tokenizers.processors.ByteLevel(trim_offsets=False), {}, False),
        ("none", None, {}, False),
        (
            "llama",
            tokenizers.processors.TemplateProcessing(
                single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
            ),
            {},
            True,
        ),
        ("explicit", None, {"add_bos_token": True}, True),
        ("deepseek", None, {"add_bos_token": False}, False),
    ]:
        directory = tmp_path / name
        tok.save(directory)
        backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        backend.post_processor = post_processor
        backend.save(str(directory / "tokenizer.json"))
        config = {"bos_token": "<bos>", "eos_token": "<eos>", "chat_template": template, **config}
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        loaded = Tokenizer.from_file(directory)
        assert loaded.encode("hi") == ([tok.bos_token_id] if adds else []) + hi, name
        user = [{"role": "user", "content": "hi"}]
        assert loaded.apply_chat_template(user) == "<bos>hi"
        assert loaded.encode_chat(user) == [tok.bos_token_id, *hi]  # (written by the template)
        assert Tokenizer.from_file(_resaved(loaded, tmp_path / f"{name}-saved")).encode("hi") == (
            loaded.encode("hi")
        )


def _resaved(tokenizer, directory):
    tokenizer.save(directory)
    return directory


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
