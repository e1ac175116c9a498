"""Drive every provider adapter through a running wasmgate with the official
`openai` Python SDK, against the recorded provider examples.

Run by tests/providers.rs with WASMGATE_BASE_URL, WASMGATE_API_KEY,
WASMGATE_FIXTURES (tests/fixtures/providers) and WASMGATE_PROVIDERS (comma
separated). For each provider, `expect.json` says what the client must see.
Prints one line per check and exits non-zero when any fails.
"""

import json
import os
import sys
import traceback

import openai
from openai import OpenAI

client = OpenAI(
    base_url=os.environ["WASMGATE_BASE_URL"], api_key=os.environ["WASMGATE_API_KEY"], max_retries=0, timeout=30
)
FIXTURES = os.environ["WASMGATE_FIXTURES"]
PROVIDERS = os.environ["WASMGATE_PROVIDERS"].split(",")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    },
}
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there"},
]


def non_stream(e):
    resp = client.chat.completions.create(
        model=e["model"], messages=MESSAGES, max_tokens=64, temperature=0.5, top_p=0.9, stop=["END"]
    )
    assert resp.object == "chat.completion", resp
    assert resp.model == e.get("reported_model", e["model"]), resp.model
    choice = resp.choices[0]
    assert choice.message.role == "assistant", choice
    assert choice.message.content == e["text"], choice.message.content
    assert choice.finish_reason == "stop", choice.finish_reason
    u = resp.usage
    assert (u.prompt_tokens, u.completion_tokens) == (e["prompt_tokens"], e["completion_tokens"]), u
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
    assert (cached or 0) == e["cached_tokens"], u


def stream(e):
    chunks = client.chat.completions.create(
        model=e["model"], messages=MESSAGES, max_tokens=64, stream=True, stream_options={"include_usage": True}
    )
    text, usage, finish, roles = "", None, None, 0
    for chunk in chunks:
        assert chunk.object in ("chat.completion.chunk", ""), chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            roles += 1 if c.delta.role == "assistant" else 0
            finish = c.finish_reason or finish
    assert text == e["stream_text"], text
    assert finish == "stop", finish
    assert roles >= 1, "no chunk carried the assistant role"
    assert usage is not None, "no usage chunk although include_usage was set"
    got = (usage.prompt_tokens, usage.completion_tokens)
    assert got == (e["stream_prompt_tokens"], e["stream_completion_tokens"]), usage


def stream_without_usage(e):
    chunks = client.chat.completions.create(model=e["model"], messages=MESSAGES, stream=True)
    seen = [c for c in chunks]
    assert all(c.usage is None for c in seen), "usage chunk sent without include_usage"
    assert "".join(c.choices[0].delta.content or "" for c in seen if c.choices) == e["stream_text"]


def tools(e):
    if e["tool"] is None:
        try:
            client.chat.completions.create(model=e["model"], messages=MESSAGES, tools=[WEATHER_TOOL])
        except openai.BadRequestError as err:
            assert e["tool_error_contains"] in str(err), err
            return
        raise AssertionError("tools were accepted by an adapter that cannot translate them")
    resp = client.chat.completions.create(
        model=e["model"],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice="auto",
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id, call
    assert call.function.name == e["tool"]["name"], call
    assert json.loads(call.function.arguments) == e["tool"]["arguments"], call.function.arguments


def tool_round_trip(e):
    """A conversation carrying an earlier tool call and its result."""
    if e["tool"] is None:
        return
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    resp = client.chat.completions.create(model=e["model"], messages=messages, tools=[WEATHER_TOOL])
    assert resp.choices[0].message.tool_calls or resp.choices[0].message.content, resp


def upstream_error(e):
    try:
        client.chat.completions.create(model=e["fail_model"], messages=MESSAGES)
    except openai.APIStatusError as err:
        assert err.status_code == e["error_status"], (err.status_code, err)
        assert e["error_contains"] in str(err), err
        if "error_code" in e:
            assert err.code == e["error_code"], err.code
        return
    raise AssertionError("an upstream error reached the client as a success")


def n_choices(e):
    """Providers generating one choice per request refuse n > 1 clearly."""
    if e.get("supports_n"):
        return
    try:
        resp = client.chat.completions.create(model=e["model"], messages=MESSAGES, n=2)
    except openai.BadRequestError as err:
        assert "`n`" in str(err), err
        return
    assert len(resp.choices) == 2, "n=2 silently answered with one choice"


def embeddings(e):
    if not e.get("embed_model"):
        try:
            client.embeddings.create(model=e["model"], input=["a"])
        except openai.APIStatusError as err:
            assert err.status_code in (400, 404), err
            return
        raise AssertionError("embeddings accepted by a chat-only adapter")
    resp = client.embeddings.create(model=e["embed_model"], input=["first text", "second text"])
    assert [d.index for d in resp.data] == [0, 1], resp.data
    for got, want in zip(resp.data, e["embeddings"]):
        assert all(abs(a - b) < 1e-6 for a, b in zip(got.embedding, want)) and len(got.embedding) == len(want), got


def safety_block(e):
    if "blocked_model" not in e:
        return
    try:
        client.chat.completions.create(model=e["blocked_model"], messages=MESSAGES)
    except openai.BadRequestError as err:
        assert err.code == "content_filter", err
        return
    raise AssertionError("a blocked prompt reached the client as a success")


PIXEL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def images(e):
    """An inline image goes to providers that take images, and is a clear 400 elsewhere."""
    content = [{"type": "text", "text": "What is in this image?"}, {"type": "image_url", "image_url": {"url": PIXEL}}]
    try:
        resp = client.chat.completions.create(model=e["model"], messages=[{"role": "user", "content": content}])
    except openai.BadRequestError as err:
        assert not e["images"], f"refused an image although the provider takes them: {err}"
        assert "image" in str(err), err
        return
    assert e["images"], "an image was accepted by an adapter that cannot send it"
    assert resp.choices[0].message.content == e["text"], resp


CHECKS = [non_stream, images, stream, stream_without_usage, tools, tool_round_trip, upstream_error, n_choices, embeddings, safety_block]

passed = failed = 0
for provider in PROVIDERS:
    with open(os.path.join(FIXTURES, provider, "expect.json")) as f:
        expect = json.load(f)
    for check in CHECKS:
        try:
            check(expect)
            passed += 1
            print(f"PASS {provider}.{check.__name__}")
        except Exception:  # noqa: BLE001 - report every failure, keep going
            failed += 1
            print(f"FAIL {provider}.{check.__name__}\n{traceback.format_exc()}")
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
