"""``python -m peft_swift_ext.serve --model <local model folder> --adapters <folder>``: serve many adapters at once.

The model and adapters load first (the server never downloads anything); then the server binds its address,
prints ``serving on http://HOST:PORT`` (with the real port when ``--port 0`` asked for a free one) and answers
until SIGINT/SIGTERM. See docs/guides/serving.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from collections.abc import Sequence

from .settings import DEFAULT_MAX_NEW_TOKENS, ServeSettings, resolve_token_limits


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m peft_swift_ext.serve``."""
    parser = argparse.ArgumentParser(
        prog="python -m peft_swift_ext.serve",
        description="Serve a base model and a folder of adapters; each request names its adapter, and concurrent "
        "requests for different adapters run as one batch.",
    )
    parser.add_argument("--model", required=True, help="local folder of the base model and its tokenizer")
    parser.add_argument("--adapters", required=True, help="folder with one sub-folder per adapter")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--backend", default="auto", choices=["auto", "peft", "swift"], help="how adapters load")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="most requests per batch (default: 16)")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests (default: 5)"
    )
    parser.add_argument(
        "--max-input-tokens",
        type=int,
        default=None,
        help="longest prompt in tokens (default: the model's context length minus --max-new-tokens)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"largest max_tokens a request may ask for (default: {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument("--max-queue", type=int, default=1024, help="most waiting requests before 503")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Check the flags, bind, load, serve; returns the exit code (2 for bad arguments or an unloadable model).

    Args:
        argv: the arguments (``sys.argv[1:]`` if ``None``).
    """
    args = build_parser().parse_args(argv)
    # Belt and braces: nothing the server loads may reach the Hugging Face Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        # Everything that can be checked without the model is checked before the slow imports and the load.
        max_input, max_new = resolve_token_limits(args.max_input_tokens, args.max_new_tokens, None)
        settings = ServeSettings(
            max_batch_size=args.max_batch_size,
            batch_wait_ms=args.batch_wait_ms,
            max_input_tokens=max_input,
            max_new_tokens=max_new,
            max_queue=args.max_queue,
        )
        # Bound, not yet listening: connections are refused until the model is loaded and the server runs.
        sock = bind(args.host, args.port)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import torch
    import uvicorn

    from .app import create_app
    from .loading import load_engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        engine = load_engine(args.model, args.adapters, backend=args.backend, dtype=args.dtype, device=device)
        max_input, max_new = resolve_token_limits(
            args.max_input_tokens, args.max_new_tokens, engine.max_position_embeddings
        )
    except (ValueError, OSError, RuntimeError) as error:
        sock.close()
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = dataclasses.replace(settings, max_input_tokens=max_input, max_new_tokens=max_new)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
    names = list(engine.adapters)
    # listening before the line that tells clients the port is ready (uvicorn's own listen() is then a no-op)
    sock.listen(2048)
    print(f"serving {len(names)} adapter(s) {names} ({engine.backend}) on http://{shown}:{port}", flush=True)
    config = uvicorn.Config(create_app(engine, settings), log_level="info", access_log=args.access_log)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one), not yet listening.

    Args:
        host: an IPv4 or IPv6 address, or a name that resolves to one.
        port: 0..65535.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ValueError(f"--host: cannot resolve {host!r}: {error}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


if __name__ == "__main__":
    sys.exit(main())
