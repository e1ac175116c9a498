"""Drive a running wasmgate's Gemini routes with Google's `google-genai` SDK.

Run by tests/ingress.rs with WASMGATE_ROOT_URL and WASMGATE_API_KEY set. The
channel is a chat-completions mock: every answer was translated.
"""

import os

from google import genai
from google.genai import errors, types

from checks import check, run

ROOT = os.environ["WASMGATE_ROOT_URL"]
OPTIONS = types.HttpOptions(base_url=ROOT, api_version="v1beta", timeout=30_000)
client = genai.Client(api_key=os.environ["WASMGATE_API_KEY"], http_options=OPTIONS)
WEATHER = types.Tool(
    function_declarations=[
        types.FunctionDeclaration(
            name="get_weather",
            description="Current weather in a city",
            parameters={"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        )
    ]
)
NO_AUTO = types.AutomaticFunctionCallingConfig(disable=True)


@check
def generate_content():
    r = client.models.generate_content(
        model="gemini-mock",
        contents="hello gemini",
        config=types.GenerateContentConfig(system_instruction="be brief", max_output_tokens=64, temperature=0.1),
    )
    assert r.text == "echo: hello gemini", r
    assert r.candidates[0].finish_reason == types.FinishReason.STOP, r
    assert r.usage_metadata.prompt_token_count == 9 and r.usage_metadata.candidates_token_count == 12, r.usage_metadata


@check
def stream_generate_content():
    text, last = "", None
    for chunk in client.models.generate_content_stream(model="gemini-mock", contents="stream gemini"):
        text += chunk.text or ""
        last = chunk
    assert text == "echo: stream gemini", text
    assert last.usage_metadata.total_token_count == 21, last


@check
def function_call_and_response():
    config = types.GenerateContentConfig(tools=[WEATHER], automatic_function_calling=NO_AUTO)
    r = client.models.generate_content(model="tool-gemini", contents="weather in Oslo", config=config)
    call = r.function_calls[0]
    assert call.name == "get_weather" and call.args == {"query": "weather in Oslo"}, r
    follow = client.models.generate_content(
        model="gemini-mock",
        contents=[
            types.Content(role="user", parts=[types.Part.from_text(text="weather in Oslo")]),
            types.Content(role="model", parts=[types.Part(function_call=call)]),
            types.Content(role="user", parts=[types.Part.from_function_response(name="get_weather", response={"temp": 12})]),
        ],
        config=config,
    )
    assert follow.text == 'echo: {"temp":12}', follow


@check
def function_call_stream():
    config = types.GenerateContentConfig(tools=[WEATHER], automatic_function_calling=NO_AUTO)
    calls = []
    for chunk in client.models.generate_content_stream(model="tool-gemini", contents="weather in Rome", config=config):
        calls += chunk.function_calls or []
    assert [(c.name, c.args) for c in calls] == [("get_weather", {"query": "weather in Rome"})], calls


@check
def count_tokens():
    counted = client.models.count_tokens(model="gemini-mock", contents="how many tokens is this?")
    assert 5 <= counted.total_tokens <= 30, counted


@check
def errors_in_google_shape():
    bad = genai.Client(api_key="sk-wrong", http_options=OPTIONS)
    try:
        bad.models.generate_content(model="gemini-mock", contents="x")
        raise AssertionError("a wrong key was accepted")
    except errors.ClientError as e:
        assert e.code == 401 and e.status == "UNAUTHENTICATED", (e.code, e.status)
    try:
        client.models.generate_content(model="no-such-model", contents="x")
        raise AssertionError("an unknown model was served")
    except errors.ClientError as e:
        assert e.code == 404 and e.status == "NOT_FOUND", (e.code, e.status)


run(f"google-genai {genai.__version__}")
