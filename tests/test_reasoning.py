"""The reasoning parsers (vLLM's --reasoning-parser): whole answers, and streamed ones cut at
every point, which give the whole answer's parts."""

import pytest

from jaxlora.server.reasoning import REASONING_PARSERS, ReasoningStream, split_reasoning

R1, QWEN3 = REASONING_PARSERS["deepseek_r1"], REASONING_PARSERS["qwen3"]


@pytest.mark.parametrize(
    "fmt, text, expected",
    [
        (R1, "Let me see.</think>The answer is 4.", ("Let me see.", "The answer is 4.")),
        (R1, "<think>Hm.</think>\n\nYes", ("Hm.", "\n\nYes")),
        (R1, "  <think>Hm.</think>", ("Hm.", None)),
        (R1, "still thinking", ("still thinking", None)),  # (no end: all reasoning)
        (R1, "</think>Just this", (None, "Just this")),
        (R1, "", (None, None)),
        (QWEN3, "<think>\nWhy?\n</think>\n\nBecause.", ("\nWhy?\n", "\n\nBecause.")),
        (QWEN3, "No thinking here.", (None, "No thinking here.")),
        (QWEN3, "<think>unfinished", (None, "<think>unfinished")),
        (QWEN3, "Text </think> after", (None, "Text </think> after")),
    ],
)
def test_whole_answers_split_into_reasoning_and_content(fmt, text, expected):
    assert split_reasoning(text, fmt) == expected


TEXTS = [
    "Let me see.</think>The answer is 4.",
    "<think>Hm, <thi </th and </thinking.</think>Yes </think> again",
    "  <think>x</think>",
    "plain reasoning with < and </ but no end",
    "<thi",
    "   ",
    "</think>",
    "<think>\nWhy?\n</think>\n\nBecause.",
    "No thinking here.",
]


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])
def test_streams_cut_anywhere_give_the_whole_answers_parts(name):
    fmt = REASONING_PARSERS[name]
    for text in TEXTS:
        reasoning, content = split_reasoning(text, fmt)
        if name == "qwen3" and text.lstrip().startswith("<think>") and "</think>" not in text:
            continue  # (streamed as reasoning before the end shows it is not)
        cuts = [[text[:i], text[i:j], text[j:]] for i in range(len(text) + 1) for j in (i, i + 3)]
        cuts.append(list(text))  # a character a delta
        for pieces in cuts:
            stream = ReasoningStream(fmt)
            got_r, got_c = "", ""
            for piece in pieces:
                r, c = stream.push(piece)
                got_r, got_c = got_r + r, got_c + c
            r, c = stream.finish()
            got_r, got_c = got_r + r, got_c + c
            assert (got_r or None, got_c or None) == (reasoning, content), (name, text, pieces)


def test_reasoning_is_handed_out_before_the_answer_ends():
    stream = ReasoningStream(R1)
    assert stream.push("<think>") == ("", "")
    assert stream.push("I think") == ("I think", "")
    assert stream.push(" so.</") == (" so.", "")  # ("</" may open the end tag)
    assert stream.push("think>Done") == ("", "Done")
    assert stream.push(" here") == ("", " here")
    assert stream.finish() == ("", "")


def test_a_grammar_starts_after_the_tags_tokens_and_a_prompt_may_close_the_reasoning(tokenizer):
    from jaxlora.server.reasoning import grammar_start, prompt_closes_reasoning

    r1, qwen3 = REASONING_PARSERS["deepseek_r1"], REASONING_PARSERS["qwen3"]
    end = tuple(tokenizer.encode("</think>", add_bos=False))
    assert grammar_start(r1, tokenizer).end == end and grammar_start(r1, tokenizer).start == ()
    assert grammar_start(qwen3, tokenizer).start == tuple(
        tokenizer.encode("<think>", add_bos=False)
    )
    for text, closed in (
        ("<|user|>\nHi\n<|assistant|>\n<think>\n\n</think>\n\n", True),
        ("<|assistant|>\n</think>", True),
        ("<|assistant|>\n<think>\n", False),
        ("<think>a</think>b<|user|>\nHi\n<|assistant|>\n", False),
        ("</think> x", False),
    ):
        ids = tokenizer.encode(text)
        tags = grammar_start(r1, tokenizer)
        assert prompt_closes_reasoning(r1, tags, tokenizer, ids) is closed, text


def test_reasoning_tokens_are_counted_up_to_the_closing_tag(tokenizer):
    from jaxlora.server.reasoning import grammar_start, reasoning_token_count

    r1 = grammar_start(REASONING_PARSERS["deepseek_r1"], tokenizer)
    qwen3 = grammar_start(REASONING_PARSERS["qwen3"], tokenizer)

    def ids(text):
        return tokenizer.encode(text, add_bos=False)

    thought = ids("<think>a b</think>")
    answer = thought + ids(" yes")
    assert reasoning_token_count(qwen3, tokenizer, answer) == len(thought)
    assert reasoning_token_count(qwen3, tokenizer, ids("  ") + answer) == len(ids("  ") + thought)
    assert reasoning_token_count(qwen3, tokenizer, ids("yes </think>")) == 0
    assert reasoning_token_count(qwen3, tokenizer, ids("<think>never closed")) == 0
    closed = ids("a b</think>")
    assert reasoning_token_count(r1, tokenizer, closed + ids(" yes")) == len(closed)
    assert reasoning_token_count(r1, tokenizer, ids("never closed")) == len(ids("never closed"))
