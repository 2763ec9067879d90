"""`muse serve`: an OpenAI-compatible completions server with continuous batching (see docs/serving.md)."""

from muse_lm.serving.app import create_app
from muse_lm.serving.engine import CompletionEvent, Engine, EngineClosedError, QueueFullError, Request
from muse_lm.serving.params import SamplingParams, ServeLimits

__all__ = ["CompletionEvent", "Engine", "EngineClosedError", "QueueFullError", "Request", "SamplingParams",
           "ServeLimits", "create_app"]
