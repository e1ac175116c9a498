"""The tiny harness the SDK check scripts share: register checks with
`@check`, then `run(label)` runs every one, prints each outcome and a
`N passed, M failed` line the Rust tests assert on, and exits non-zero on
any failure."""

import sys

_checks = []

# The function tool the Responses checks call (as the Responses API shapes it).
WEATHER_FUNCTION = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
}


def check(fn):
    _checks.append(fn)
    return fn


def run(label):
    failed = 0
    for fn in _checks:
        try:
            fn()
            print(f"ok      {fn.__name__}")
        except Exception as e:  # noqa: BLE001 - report every check, then fail
            failed += 1
            print(f"FAILED  {fn.__name__}: {type(e).__name__}: {e}")
    print(f"{label}: {len(_checks) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
