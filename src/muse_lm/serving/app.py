"""The ASGI app (Starlette): OpenAI-compatible /v1/completions in front of an `Engine`.

The engine runs in its own thread; each HTTP request hands it a callback that moves the engine's
events onto the request's asyncio queue (`call_soon_threadsafe`), so the event loop never blocks
on the model. A client that goes away (mid-stream, or while waiting for a whole completion)
cancels its request, which frees its batch slot before the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from muse_lm.serving.engine import CompletionEvent, Engine, EngineClosedError, QueueFullError, Request
from muse_lm.serving.protocol import (
    CompletionRequest,
    RequestError,
    completion_body,
    error_body,
    parse_completion_request,
    usage_body,
)


def create_app(engine: Engine, *, model_name: str = "muse") -> Starlette:
    """The app; its lifespan starts the engine thread and stops it at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        engine.start()
        try:
            yield
        finally:
            # stop() joins the engine thread: off the event loop, which must keep running meanwhile.
            await asyncio.to_thread(engine.stop)

    async def completions(request: HTTPRequest) -> Response:
        try:
            body = await _read_body(request, engine.limits.max_request_bytes)
            parsed = parse_completion_request(_json(body), model_name)
            return await _complete(engine, model_name, parsed, request)
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)

    async def models(request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "muse_lm"}]})

    async def stats(request: HTTPRequest) -> Response:
        return JSONResponse(engine.stats())

    async def http_error(request: HTTPRequest, exc: HTTPException) -> Response:
        # Unknown paths and wrong methods answer in OpenAI's error shape too.
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}"),
                            status_code=exc.status_code)

    routes = [Route("/v1/completions", completions, methods=["POST"]), Route("/v1/models", models),
              Route("/v1/stats", stats)]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


async def _read_body(request: HTTPRequest, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes: from its
    Content-Length before reading anything, else (chunked uploads) while the chunks arrive. Nothing
    larger than the limit is ever held in memory, parsed or tokenized."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int, size: int | None = None) -> RequestError:
    what = "is more than" if size is None else f"is {size} bytes, more than"
    return RequestError(f"the request body {what} this server's limit of {limit} bytes (muse serve "
                        "--max-request-bytes); send a shorter prompt", status=413, code="request_too_large")


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON ({err}); send a JSON object") from None


def _submit(engine: Engine, parsed: CompletionRequest) -> tuple[Request, asyncio.Queue]:
    """Queues the request with the engine; its events arrive on the returned asyncio queue."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[CompletionEvent] = asyncio.Queue()

    def on_event(event: CompletionEvent) -> None:  # called in the engine thread
        if not loop.is_closed():
            loop.call_soon_threadsafe(events.put_nowait, event)

    try:
        prompt_ids = engine.encode(parsed.prompt)
        return engine.submit(prompt_ids, parsed.params, on_event), events
    except QueueFullError as err:
        raise RequestError(str(err), status=429, code="queue_full", kind="server_overloaded") from None
    except EngineClosedError as err:
        raise RequestError(str(err), status=503, code="shutting_down", kind="server_error") from None
    except ValueError as err:
        param = "max_tokens" if "max_tokens" in str(err) else "prompt"
        raise RequestError(str(err), param=param) from None


async def _complete(engine: Engine, model: str, parsed: CompletionRequest, request: HTTPRequest) -> Response:
    handle, events = _submit(engine, parsed)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if parsed.stream:
        return StreamingResponse(_sse(handle, events, rid, created, model, parsed.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    collector = asyncio.ensure_future(_collect(events))
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not collector.done():
            collector.cancel()
            handle.cancel()  # the client left (or the server is shutting down): free the slot
    if not collector.done() or collector.cancelled():
        return Response(status_code=499)  # nobody reads it
    text, last = collector.result()
    if last.error:
        return JSONResponse(error_body(last.error, kind="server_error"), status_code=503)
    usage = usage_body(last.prompt_tokens, last.completion_tokens)
    return JSONResponse(completion_body(rid, created, model, text, last.finish_reason, usage))


async def _collect(events: asyncio.Queue) -> tuple[str, CompletionEvent]:
    parts = []
    while True:
        event = await events.get()
        parts.append(event.text)
        if event.finish_reason or event.error:
            return "".join(parts), event


async def _disconnected(request: HTTPRequest) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(handle: Request, events: asyncio.Queue, rid: str, created: int, model: str, include_usage: bool):
    """Server-sent events: `data: {chunk}` per text delta, the finish chunk, `data: [DONE]`.

    Starlette cancels this generator when the client disconnects; `finally` then frees the slot.
    """
    try:
        while True:
            event = await events.get()
            if event.error:
                yield _sse_line(error_body(event.error, kind="server_error"))
                break
            yield _sse_line(completion_body(rid, created, model, event.text, event.finish_reason))
            if event.finish_reason:
                if include_usage:
                    usage = usage_body(event.prompt_tokens, event.completion_tokens)
                    yield _sse_line({**completion_body(rid, created, model, "", None), "choices": [],
                                     "usage": usage})
                break
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # a no-op once the request has finished


def _sse_line(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
