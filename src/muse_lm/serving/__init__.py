"""`muse serve`: an OpenAI-compatible completions server with continuous batching (see docs/serving.md).

The names below load on first use (PEP 562): `muse train` and friends import `muse_lm.serving.cli`
to register the `serve` subcommand, and must not need the ASGI stack (starlette, uvicorn) to start.
"""

from importlib import import_module

_EXPORTS = {
    "create_app": "muse_lm.serving.app",
    "CompletionEvent": "muse_lm.serving.engine",
    "Engine": "muse_lm.serving.engine",
    "EngineClosedError": "muse_lm.serving.engine",
    "QueueFullError": "muse_lm.serving.engine",
    "Request": "muse_lm.serving.engine",
    "SamplingParams": "muse_lm.serving.params",
    "ServeLimits": "muse_lm.serving.params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
