"""The stream decoder of `py-openai`: OpenAI's Server-Sent Events, split
anywhere, into chunks. componentize-py finds an exported resource in a
module named after its interface (`adapter`)."""

import json

from wit_world.exports import adapter
from wit_world.imports import types
from componentize_py_types import Err

import common


class StreamDecoder(adapter.StreamDecoder):
    def __init__(self, ctx: types.RequestContext) -> None:
        self.pending = b""
        self.model = ctx.requested_model

    def _events(self, data: bytes, final: bool) -> adapter.StreamEvents:
        self.pending += data
        lines = self.pending.split(b"\n")
        self.pending = b"" if final else lines.pop()
        out = adapter.StreamEvents(chunks=[], usage=None, error=None, done=False)
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # comments, `event:` lines, keep-alives
            payload = line[5:].strip()
            if payload == b"[DONE]":
                out.done = True
                break
            try:
                chunk = json.loads(payload)
            except ValueError:
                raise Err(common.error(types.ErrorKind_Transient(), "The upstream sent a stream event that is not JSON.", None))
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                out.error = common.classify(500, chunk)
                break
            if chunk.get("usage"):
                out.usage = common.usage(chunk["usage"])
            chunk["model"] = self.model
            out.chunks.append(json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode())
        return out

    def feed(self, data: bytes) -> adapter.StreamEvents:
        return self._events(data, False)

    def finish(self) -> adapter.StreamEvents:
        return self._events(b"\n", True)
