"""Drive a running wasmgate's /v1/messages with the official `anthropic` SDK.

Run by tests/ingress.rs with WASMGATE_ROOT_URL (the gateway's root; the SDK
adds /v1/messages) and WASMGATE_API_KEY set. The channel is an OpenAI-style
mock: every answer here was translated from a chat completion.
"""

import os

import anthropic

from checks import check, run

client = anthropic.Anthropic(
    base_url=os.environ["WASMGATE_ROOT_URL"], api_key=os.environ["WASMGATE_API_KEY"], max_retries=0, timeout=30
)
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
}


@check
def message_non_stream():
    msg = client.messages.create(
        model="claude-mock",
        max_tokens=64,
        system="be brief",
        messages=[{"role": "user", "content": "hello claude"}],
    )
    assert msg.type == "message" and msg.role == "assistant", msg
    assert msg.content[0].type == "text" and msg.content[0].text == "echo: hello claude", msg
    assert msg.stop_reason == "end_turn", msg
    assert msg.usage.input_tokens == 6 and msg.usage.cache_read_input_tokens == 3, msg.usage
    assert msg.usage.output_tokens == 12, msg.usage


@check
def message_stream():
    with client.messages.stream(
        model="claude-mock", max_tokens=64, messages=[{"role": "user", "content": "stream claude"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: stream claude", text
    assert final.content[0].text == text, final
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 12, final


@check
def tool_use_and_tool_result():
    msg = client.messages.create(
        model="tool-claude",
        max_tokens=64,
        tools=[WEATHER],
        messages=[{"role": "user", "content": "weather in Oslo"}],
    )
    assert msg.stop_reason == "tool_use", msg
    call = msg.content[0]
    assert call.type == "tool_use" and call.name == "get_weather", msg
    assert call.input == {"query": "weather in Oslo"}, call.input
    follow = client.messages.create(
        model="claude-mock",
        max_tokens=64,
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "weather in Oslo"},
            {"role": "assistant", "content": [c.model_dump() for c in msg.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "12C"}]},
        ],
    )
    assert follow.content[0].text == "echo: 12C", follow


@check
def tool_use_stream():
    with client.messages.stream(
        model="tool-claude",
        max_tokens=64,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "weather in Rome"}],
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds or "content_block_delta" in kinds, kinds
    assert final.content[0].type == "tool_use" and final.content[0].input == {"query": "weather in Rome"}, final
    assert final.stop_reason == "tool_use", final


@check
def count_tokens():
    counted = client.messages.count_tokens(
        model="claude-mock", messages=[{"role": "user", "content": "how many tokens is this?"}]
    )
    assert 5 <= counted.input_tokens <= 30, counted


@check
def errors_in_anthropic_shape():
    bad = anthropic.Anthropic(base_url=os.environ["WASMGATE_ROOT_URL"], api_key="sk-wrong", max_retries=0)
    try:
        bad.messages.create(model="claude-mock", max_tokens=8, messages=[{"role": "user", "content": "x"}])
        raise AssertionError("a wrong key was accepted")
    except anthropic.AuthenticationError as e:
        assert e.body["type"] == "error" and e.body["error"]["type"] == "authentication_error", e.body
    try:
        client.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "x"}])
        raise AssertionError("an unknown model was served")
    except anthropic.NotFoundError as e:
        assert e.body["error"]["type"] == "not_found_error", e.body


run(f"anthropic {anthropic.__version__}")
