"""`muse serve`: the completions server on uvicorn (its signal handling gives the clean shutdown)."""

from __future__ import annotations

import argparse
import logging
import socket

from muse_lm.errors import ConfigError

log = logging.getLogger("muse_lm.serving")

# Seconds that open requests get to finish after Ctrl-C / SIGTERM before they are cut off.
GRACEFUL_SHUTDOWN_S = 30


def _int_at_least(minimum: int, name: str, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"{name} {text} is invalid: it must be >= {minimum}{upper}")
        return value

    return parse


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """Adds `muse serve` to the `muse` subparsers."""
    p = sub.add_parser("serve", help="serve a trained model over HTTP (OpenAI-compatible /v1/completions)")
    p.add_argument("--checkpoint", required=True, help="run directory or step-NNNNNNN directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_at_least(0, "--port", 65535), default=8000,
                   help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--model-name", default="muse", help="the model id clients send (default: muse)")
    p.add_argument("--max-batch-size", type=_int_at_least(1, "--max-batch-size"), default=32,
                   help="sequences decoded together at most (default 32)")
    p.add_argument("--max-queue", type=_int_at_least(1, "--max-queue"), default=256,
                   help="requests waiting for a slot at most; more get HTTP 429 (default 256)")
    p.add_argument("--max-prompt-tokens", type=_int_at_least(1, "--max-prompt-tokens"), default=4096,
                   help="longer prompts get HTTP 400 (default 4096)")
    p.add_argument("--max-tokens-cap", type=_int_at_least(1, "--max-tokens-cap"), default=2048,
                   help="largest max_tokens a request may ask for (default 2048)")
    p.add_argument("--max-request-bytes", type=_int_at_least(1, "--max-request-bytes"), default=1 << 20,
                   help="larger request bodies get HTTP 413 before they are parsed (default 1048576 = 1 MiB)")
    p.add_argument("--threads", type=_int_at_least(1, "--threads"), default=None,
                   help="CPU threads for the model (default: PyTorch's; 1 is often fastest for small models)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.set_defaults(func=cmd_serve)
    return p


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; a busy port or bad address is a ConfigError (exit 2)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"--host {host!r} cannot be resolved ({err.strerror}); use an IP such as 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or stop "
                          "whatever is using it") from None
    sock.listen(2048)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    """Loads the checkpoint, binds the socket, serves until SIGINT/SIGTERM. Returns the exit code."""
    import torch
    import uvicorn

    from muse_lm.serving.app import create_app
    from muse_lm.serving.engine import Engine
    from muse_lm.serving.params import ServeLimits
    from muse_lm.training.distributed import DistInfo
    from muse_lm.training.loading import load_trained
    from muse_lm.training.run import resolve_device
    from muse_lm.training.tokenizer import eos_id

    limits = ServeLimits(max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                         max_prompt_tokens=args.max_prompt_tokens, max_tokens_cap=args.max_tokens_cap,
                         max_request_bytes=args.max_request_bytes)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, DistInfo())
    sock = bind_socket(args.host, args.port)  # first: a busy port fails before the model loads
    try:
        trained = load_trained(args.checkpoint, device)
        engine = Engine(trained.model, trained.tokenizer, eos_token_id=eos_id(trained.tokenizer), limits=limits)
        host, port = sock.getsockname()[:2]
        log.info("muse serve: %s (%s) on http://%s:%d/v1 — Ctrl-C stops it", args.model_name, trained.path, host, port)
        config = uvicorn.Config(create_app(engine, model_name=args.model_name), log_level="info",
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:
            # uvicorn shuts down gracefully on the first Ctrl-C, then re-raises it for the caller: done.
            # (SIGTERM is re-raised the same way and ends the process with that signal, as supervisors expect.)
            log.info("muse serve: stopped")
    finally:
        sock.close()
    return 0
