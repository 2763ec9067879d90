"""The OpenAI completions schema: request validation and response bodies (plain dicts, no HTTP)."""

from __future__ import annotations

from dataclasses import dataclass

from muse_lm.serving.params import SamplingParams

# Fields of OpenAI's /v1/completions that this server does not implement: accepted only at the
# value that means "off", so a client never silently gets something other than what it asked for.
_UNSUPPORTED_AT_DEFAULT = {"echo": (False,), "logprobs": (None,), "best_of": (None, 1), "suffix": (None,),
                           "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {})}
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "ignore_eos")
_KNOWN = {"model", "prompt", "n", "stop", "stream", "stream_options", "user", *_SAMPLING_FIELDS,
          *_UNSUPPORTED_AT_DEFAULT}


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-shaped error body with `status`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, kind=self.kind, param=self.param, code=self.code)


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_completion_request(body: object, served_model: str) -> CompletionRequest:
    """A decoded JSON body -> CompletionRequest. Raises RequestError (400, or 404 for another model)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; see docs/serving.md for the fields this server takes",
                           param=unknown[0])
    model = body.get("model")
    if model != served_model:
        raise RequestError(f"model {model!r} is not served here; this server serves {served_model!r} "
                           "(see GET /v1/models)", status=404, param="model", code="model_not_found")
    for name, allowed in _UNSUPPORTED_AT_DEFAULT.items():
        if name in body and body[name] not in allowed:
            raise RequestError(f"{name}={body[name]!r} is not supported by this server; leave it out",
                               param=name)
    if body.get("n") not in (None, 1):
        raise RequestError(f"n={body['n']!r} is not supported: this server returns one choice per request (n=1); "
                           "send several requests instead", param="n")
    return CompletionRequest(prompt=_prompt(body.get("prompt")), params=_sampling_params(body),
                             stream=_flag(body, "stream"), include_usage=_include_usage(body))


def _prompt(prompt: object) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string (or a list of exactly one string)", param="prompt")
    return prompt


def _sampling_params(body: dict) -> SamplingParams:
    # null means "the default", as in OpenAI's API.
    kwargs = {name: body[name] for name in _SAMPLING_FIELDS if body.get(name) is not None}
    stop = body.get("stop")
    if stop is not None:
        kwargs["stop"] = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else stop
    try:
        return SamplingParams(**kwargs)
    except ValueError as err:
        message = str(err)
        raise RequestError(message, param=message.split("=", 1)[0]) from None


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value not in (None, True, False):
        raise RequestError(f"{name}={value!r} must be true or false", param=name)
    return bool(value)


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError("stream_options must be an object with at most the field include_usage",
                           param="stream_options")
    if not _flag(body, "stream"):
        raise RequestError("stream_options is only allowed with stream=true", param="stream_options")
    return _flag(options, "include_usage")


def completion_body(rid: str, created: int, model: str, text: str, finish_reason: str | None,
                    usage: dict | None = None) -> dict:
    """A whole completion, or one streamed chunk of it (same object, as in OpenAI's API)."""
    body = {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}
    if usage is not None:
        body["usage"] = usage
    return body


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
