"""What the adapter and its stream decoder share: usage and error mapping."""

from wit_world.imports import types


def error(kind, message, status):
    return types.UpstreamError(kind=kind, message=message, status=status)


def usage(raw):
    """OpenAI's `usage` object as the contract's record (None when absent)."""
    if not isinstance(raw, dict):
        return None
    prompt = int(raw.get("prompt_tokens") or 0)
    completion = int(raw.get("completion_tokens") or 0)
    details = raw.get("prompt_tokens_details") or {}
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    total = int(raw.get("total_tokens") or prompt + completion)
    return types.Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached, total_tokens=total)


def classify(status, answer):
    """An upstream error from its status and OpenAI-shaped body. The message
    shown to the client is the upstream's own, which never holds our key."""
    err = answer.get("error") if isinstance(answer, dict) else None
    code = (err or {}).get("code") if isinstance(err, dict) else None
    message = (err or {}).get("message") if isinstance(err, dict) else None
    message = message if isinstance(message, str) and message else f"The upstream answered {status}."
    if status == 401 or status == 403 or code == "invalid_api_key":
        kind = types.ErrorKind_Auth()
    elif code == "insufficient_quota":
        kind = types.ErrorKind_QuotaExhausted()
    elif status == 429:
        kind = types.ErrorKind_RateLimited(None)
    elif code == "model_not_found" or status == 404:
        kind = types.ErrorKind_ModelNotFound()
    elif code == "content_filter":
        kind = types.ErrorKind_ContentFiltered()
    elif status >= 500 or status == 408:
        kind = types.ErrorKind_Transient()
    elif 400 <= status < 500:
        kind = types.ErrorKind_BadRequest()
    else:
        kind = types.ErrorKind_Other()
    return error(kind, message[:500], status)
