"""The rest of the OpenAI surface through the official `openai` Python SDK:
image generation, speech (a binary stream), transcription and translation
(multipart uploads), moderations, and rerank (no SDK call: raw HTTP with
the SDK's own client). Run by tests/relayed.rs against a gateway relaying
to the mock upstream through the `openai` adapter.
"""

import os

import httpx
from openai import OpenAI

from checks import check, run

BASE = os.environ["WASMGATE_BASE_URL"]
KEY = os.environ["WASMGATE_API_KEY"]
client = OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=30)
AUDIO = ("clip.mp3", b"\x00\x01" * 4096, "audio/mpeg")


@check
def images_generate():
    out = client.images.generate(model="dall-e-3", prompt="a lighthouse at dawn", n=2)
    assert len(out.data) == 2, out
    assert out.data[0].url.startswith("https://images.example/"), out


@check
def speech_streams_audio_bytes():
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input="a" * 2500) as r:
        assert r.headers["content-type"] == "audio/mpeg", r.headers
        audio = b"".join(r.iter_bytes())
    assert len(audio) == 16 * 4096, len(audio)


@check
def transcription_multipart():
    out = client.audio.transcriptions.create(model="whisper-1", file=AUDIO)
    assert out.text == "hello from the audio", out


@check
def translation_multipart():
    out = client.audio.translations.create(model="whisper-1", file=AUDIO)
    assert out.text == "hello from the audio", out


@check
def moderations():
    out = client.moderations.create(model="omni-moderation-latest", input="I hate mondays")
    assert out.results[0].flagged is True, out


@check
def rerank_raw_http():
    body = {"model": "rerank-1", "query": "lighthouse", "documents": ["a", "b", "c"], "top_n": 3}
    r = httpx.post(f"{BASE}/rerank", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [2, 1, 0], results


run("relayed")
