"""The tiny harness the SDK check scripts share: register checks with
`@check`, then `run(label)` runs every one, prints each outcome and a
`N passed, M failed` line the Rust tests assert on, and exits non-zero on
any failure."""

import sys

_checks = []


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
