"""Drive a running wasmgate's /v1/responses with the official `openai` SDK.

Run by tests/ingress.rs with WASMGATE_BASE_URL and WASMGATE_API_KEY set. The
channel is a chat-completions mock: every answer was translated.
"""

import json
import os

import openai
from openai import OpenAI

from checks import WEATHER_FUNCTION as WEATHER, check, run

client = OpenAI(base_url=os.environ["WASMGATE_BASE_URL"], api_key=os.environ["WASMGATE_API_KEY"], max_retries=0, timeout=30)


@check
def response_non_stream():
    r = client.responses.create(model="gpt-4o-mini", instructions="be brief", input="hello responses")
    assert r.object == "response" and r.status == "completed", r
    assert r.output_text == "echo: hello responses", r
    assert r.usage.input_tokens == 9 and r.usage.output_tokens == 12, r.usage
    assert r.usage.input_tokens_details.cached_tokens == 3, r.usage


@check
def response_stream_events():
    kinds, numbers = [], []
    with client.responses.stream(model="gpt-4o-mini", input="stream responses") as stream:
        for event in stream:
            kinds.append(event.type)
            numbers.append(event.sequence_number)
        final = stream.get_final_response()
    for kind in ["response.created", "response.in_progress", "response.output_item.added",
                 "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                 "response.output_item.done", "response.completed"]:
        assert kind in kinds, (kind, kinds)
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), numbers
    assert final.output_text == "echo: stream responses", final
    assert final.usage.output_tokens == 12, final.usage
    # Stored before its last events were sent: readable as soon as the stream ends.
    got = client.responses.retrieve(final.id)
    assert got.id == final.id and got.output_text == "echo: stream responses", got


@check
def function_call_then_output_continues_by_id():
    r = client.responses.create(model="tool-mock", input="weather in Oslo", tools=[WEATHER])
    call = r.output[0]
    assert call.type == "function_call" and call.name == "get_weather", r.output
    assert json.loads(call.arguments) == {"query": "weather in Oslo"}, call.arguments
    follow = client.responses.create(
        model="gpt-4o-mini",
        previous_response_id=r.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "12C"}],
        tools=[WEATHER],
    )
    assert follow.output_text == "echo: 12C", follow
    assert follow.previous_response_id == r.id, follow


@check
def function_call_stream():
    kinds = []
    with client.responses.stream(model="tool-mock", input="weather in Rome", tools=[WEATHER]) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds, kinds
    assert json.loads(final.output[0].arguments) == {"query": "weather in Rome"}, final.output


@check
def retrieve_and_delete():
    r = client.responses.create(model="gpt-4o-mini", input="keep me")
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == "echo: keep me", got
    client.responses.delete(r.id)
    try:
        client.responses.retrieve(r.id)
        raise AssertionError("a deleted response was still served")
    except openai.NotFoundError:
        pass
    unstored = client.responses.create(model="gpt-4o-mini", input="forget me", store=False)
    try:
        client.responses.retrieve(unstored.id)
        raise AssertionError("a response with store=false was kept")
    except openai.NotFoundError:
        pass


@check
def structured_output_request_is_accepted():
    r = client.responses.create(
        model="gpt-4o-mini",
        input="json please",
        text={"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": True}},
        max_output_tokens=40,
    )
    assert r.status == "completed" and r.max_output_tokens == 40, r


run(f"openai {openai.__version__} responses")
