"""The Responses API passed through natively: the official `openai` SDK
against a channel whose upstream serves `/v1/responses` itself (a channel
opted in with `"responses": "native"`). Requests with `store: false`
(what Codex CLI sends) go upstream unchanged and the upstream's own
objects and events come back (ids `resp_native_…`). Run by
tests/ingress.rs with WASMGATE_BASE_URL and WASMGATE_API_KEY.
"""

import json
import os

import openai
from openai import OpenAI

from checks import WEATHER_FUNCTION as WEATHER, check, run

client = OpenAI(base_url=os.environ["WASMGATE_BASE_URL"], api_key=os.environ["WASMGATE_API_KEY"], max_retries=0, timeout=30)


@check
def native_non_stream():
    r = client.responses.create(model="gpt-4o-mini", input="hello native", store=False)
    assert r.id == "resp_native_1" and r.output_text == "echo: hello native", r
    assert r.usage.input_tokens == 9 and r.usage.output_tokens == 12, r.usage


@check
def native_stream():
    kinds = []
    with client.responses.stream(model="gpt-4o-mini", input="stream native", store=False) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert final.id == "resp_native_1" and final.output_text == "echo: stream native", final


@check
def native_function_call_round_trip():
    r = client.responses.create(model="tool-mock", input="weather in Oslo", tools=[WEATHER], store=False)
    call = r.output[0]
    assert call.type == "function_call" and json.loads(call.arguments) == {"query": "weather in Oslo"}, r.output
    follow = client.responses.create(
        model="gpt-4o-mini",
        store=False,
        tools=[WEATHER],
        input=[
            {"role": "user", "content": "weather in Oslo"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "12C"},
        ],
    )
    assert follow.output_text == "echo: 12C", follow


@check
def stored_responses_stay_with_the_gateway():
    r = client.responses.create(model="gpt-4o-mini", input="keep me")
    assert r.id != "resp_native_1" and r.output_text == "echo: keep me", r
    assert client.responses.retrieve(r.id).id == r.id


run(f"openai {openai.__version__} native responses")
