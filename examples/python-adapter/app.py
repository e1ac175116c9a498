"""`py-openai`: a wasmgate provider adapter written in Python, for any
OpenAI-compatible upstream. Built into a component by componentize-py:

    componentize-py -d ../../wit -w adapter-plugin componentize app -o py-openai.wasm

It is the proof that the contract is language-neutral: the same WIT, the
same `wasmgate plugin check`, the same hot swap as the Rust adapters. The
stream decoder lives in `adapter.py` (componentize-py looks for an exported
resource in a module named after its interface).
"""

import json

from wit_world import exports
from wit_world.exports import adapter
from wit_world.imports import types
from componentize_py_types import Err

import common

ENDPOINT_PATHS = {
    types.Endpoint.CHAT_COMPLETIONS: "/chat/completions",
    types.Endpoint.COMPLETIONS: "/completions",
    types.Endpoint.EMBEDDINGS: "/embeddings",
    types.Endpoint.MODELS: "/models",
}


class Adapter(exports.Adapter):
    def info(self) -> adapter.AdapterInfo:
        return adapter.AdapterInfo(
            name="py-openai",
            version="0.1.0",
            description="OpenAI-compatible upstreams, written in Python (componentize-py)",
            endpoints=list(ENDPOINT_PATHS),
            default_models=["gpt-4o-mini"],
        )

    def build_request(self, ctx: types.RequestContext, channel: types.Channel, body: bytes) -> types.HttpRequest:
        try:
            request = json.loads(body)
        except ValueError:
            raise Err(common.error(types.ErrorKind_BadRequest(), "The request body is not JSON.", None))
        if not isinstance(request, dict):
            raise Err(common.error(types.ErrorKind_BadRequest(), "The request body must be a JSON object.", None))
        request["model"] = ctx.upstream_model
        headers = [
            types.Header(name="authorization", value=f"Bearer {channel.key}"),
            types.Header(name="content-type", value="application/json"),
        ]
        if ctx.stream:
            headers.append(types.Header(name="accept", value="text/event-stream"))
        if ctx.endpoint == types.Endpoint.MODELS:
            return types.HttpRequest(method=types.HttpMethod.GET, url=channel.base_url + "/models", headers=headers[:1], body=b"")
        return types.HttpRequest(
            method=types.HttpMethod.POST,
            url=channel.base_url + ENDPOINT_PATHS[ctx.endpoint],
            headers=headers,
            body=json.dumps(request, separators=(",", ":")).encode(),
        )

    def parse_response(self, ctx: types.RequestContext, response: types.HttpResponse) -> adapter.ParsedResponse:
        try:
            answer = json.loads(response.body)
        except ValueError:
            raise Err(common.error(types.ErrorKind_Transient(), "The upstream answered with a body that is not JSON.", response.status))
        if not isinstance(answer, dict) or "error" in answer:
            raise Err(common.classify(response.status or 502, answer))
        if ctx.endpoint != types.Endpoint.MODELS:
            answer["model"] = ctx.requested_model
        return adapter.ParsedResponse(
            body=json.dumps(answer, separators=(",", ":"), ensure_ascii=False).encode(),
            usage=common.usage(answer.get("usage")),
        )

    def classify_error(self, ctx: types.RequestContext, response: types.HttpResponse) -> types.UpstreamError:
        try:
            answer = json.loads(response.body)
        except ValueError:
            answer = None
        classified = common.classify(response.status, answer)
        if isinstance(classified.kind, types.ErrorKind_RateLimited):
            retry_after = next((h.value for h in response.headers if h.name == "retry-after"), "")
            if retry_after.isdigit():
                classified.kind = types.ErrorKind_RateLimited(int(retry_after))
        return classified

    def health_probe(self, channel: types.Channel) -> adapter.Probe:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        return adapter.Probe(endpoint=types.Endpoint.CHAT_COMPLETIONS, model="gpt-4o-mini", body=json.dumps(body).encode())
