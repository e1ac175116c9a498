"""Drive a running wasmgate with the official `openai` Python SDK.

Run by tests/openai_sdk.rs with WASMGATE_BASE_URL and WASMGATE_API_KEY set;
every check raises on failure, and the process exits non-zero.
"""

import os

import openai
from openai import OpenAI

from checks import check, run

BASE_URL = os.environ["WASMGATE_BASE_URL"]
API_KEY = os.environ["WASMGATE_API_KEY"]

client = OpenAI(base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=30)


@check
def chat_non_stream():
    resp = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hello sdk"}],
        temperature=0.2,
    )
    assert resp.object == "chat.completion", resp
    assert resp.choices[0].message.content == "echo: hello sdk", resp
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens == 9 and resp.usage.completion_tokens == 12, resp.usage
    assert resp.usage.prompt_tokens_details.cached_tokens == 3, resp.usage


@check
def chat_stream_with_usage():
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream to me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == "echo: stream to me", text
    assert finish == "stop"
    assert usage is not None and usage.total_tokens == 21, usage


@check
def chat_stream_without_usage():
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "no usage"}],
            stream=True,
        )
    )
    assert chunks, "no chunks"
    # Every chunk has a choice: no usage-only chunk the client did not ask for.
    assert all(len(c.choices) == 1 for c in chunks), chunks
    assert all(c.usage is None for c in chunks)


@check
def completions():
    resp = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say this")
    assert resp.choices[0].text == "echo: say this", resp
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="gpt-3.5-turbo-instruct", prompt="p", stream=True)
        if c.choices
    )
    assert streamed == "echo: p", streamed


@check
def embeddings():
    resp = client.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"])
    assert len(resp.data) == 3, resp
    assert len(resp.data[0].embedding) == 8
    assert resp.usage.prompt_tokens == 4


@check
def models():
    ids = {m.id for m in client.models.list()}
    assert {"gpt-4o-mini", "text-embedding-3-small"} <= ids, ids
    assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"


@check
def errors_are_typed_like_openai():
    bad = OpenAI(base_url=BASE_URL, api_key="sk-wrong", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401 and e.code == "invalid_api_key", e
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=[])
        raise AssertionError("empty messages accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.param == "messages", e


run(f"openai SDK {openai.__version__}")
