"""The shipped filters through the official `openai` Python SDK, streamed
and not. Run by tests/filters.rs against a gateway whose rules put
`block-list` on `guarded` (words "forbidden fruit" and "echo", pattern
`secret-[0-9]+`) and on `guarded-split` (the phrase "echo: hello"),
`pii-redact` on `pii`, `prompt-cap` (60 characters) on `capped`, and the
trapping fixture on `trap-closed` (fail closed) and `trap-open` (skipped).
The mock upstream answers "echo: <the prompt it received>", streamed word
by word.
"""

import os

import openai
from openai import OpenAI

from checks import check, run

client = OpenAI(base_url=os.environ["WASMGATE_BASE_URL"], api_key=os.environ["WASMGATE_API_KEY"], max_retries=0, timeout=30)


def ask(model, text, stream=False):
    """The answer's text (a stream's chunks joined)."""
    messages = [{"role": "user", "content": text}]
    if not stream:
        return client.chat.completions.create(model=model, messages=messages).choices[0].message.content
    out = ""
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True):
        for choice in chunk.choices:
            out += choice.delta.content or ""
    return out


def refused(model, text, stream, code, status=400):
    """The request fails with `code` (before the stream starts, or as its
    error event) and no text of the answer is returned."""
    got = ""
    try:
        got = ask(model, text, stream)
    except openai.APIStatusError as e:
        assert e.status_code == status, (e.status_code, e.body)
        assert e.body["code"] == code and e.body["message"], e.body
        return
    except openai.APIError as e:  # an error event inside a started stream
        assert code in str(e.body or e.message), e
        return
    raise AssertionError(f"{model} was not refused; got {got!r}")


@check
def block_list_refuses_prompts_with_listed_words_or_patterns():
    for stream in (False, True):
        refused("guarded", "tell me about the Forbidden Fruit", stream, "content_blocked")
        refused("guarded", "my code is secret-42", stream, "content_blocked")


@check
def block_list_masks_listed_words_in_answers():
    assert ask("guarded", "hello sdk") == "***: hello sdk"
    assert ask("guarded", "hello sdk", stream=True) == "***: hello sdk"


@check
def block_list_stops_a_stream_at_a_phrase_split_across_chunks():
    # Not streamed, the phrase is masked in one piece.
    assert ask("guarded-split", "hello world") == "*** world"
    refused("guarded-split", "hello world", True, "content_blocked")


@check
def pii_redact_rewrites_prompts_before_the_upstream_sees_them():
    prompt = "mail jane.doe@corp.example, call +1 415 555 0132, card 4111 1111 1111 1111"
    expected = "echo: mail [EMAIL], call [PHONE], card [CARD]"
    assert ask("pii", prompt) == expected, ask("pii", prompt)
    assert ask("pii", prompt, stream=True) == expected


@check
def prompt_cap_refuses_prompts_over_budget():
    assert ask("capped", "short and sweet") == "echo: short and sweet"
    for stream in (False, True):
        refused("capped", "x" * 200, stream, "prompt_too_large")


@check
def a_trapping_filter_fails_only_its_request_when_closed():
    for stream in (False, True):
        refused("trap-closed", "please trap now", stream, "plugin_error", status=502)
    assert ask("trap-closed", "an ordinary prompt") == "echo: an ordinary prompt"


@check
def a_trapping_filter_is_skipped_when_open():
    assert ask("trap-open", "please trap now") == "echo: please trap now"
    assert ask("trap-open", "please trap now", stream=True) == "echo: please trap now"


@check
def unfiltered_models_are_untouched():
    assert ask("plain", "forbidden fruit secret-1 jane@corp.example") == "echo: forbidden fruit secret-1 jane@corp.example"


run("filters")
