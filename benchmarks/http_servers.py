"""The hello-world servers `benchmarks.http` measures, each the same constant answer (`HELLO`, 13 bytes, with
Content-Type and Content-Length) on one of the candidate stacks:

- `ours`: eventfn's `HttpServer` (an asyncio protocol on httptools), run here as `python -m benchmarks.http_servers
  ours --port P`, on the standard asyncio loop, as `eventfn serve` runs it;
- `asgi_hello`: an ASGI app, for uvicorn (`--loop asyncio --http httptools`) and granian (`--interface asgi`);
- `rsgi_hello`: the same on granian's own interface (`--interface rsgi`).

Each server is a process of its own; `command` gives its command line.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

HELLO = b"Hello, world!"
_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(HELLO)).encode())]

#: The stacks, in the order measured: (key, label).
STACKS = [
    ("ours", "eventfn HttpServer (httptools, asyncio)"),
    ("uvicorn", "uvicorn + httptools, ASGI, asyncio loop"),
    ("granian-rsgi", "granian, RSGI, 1 worker, asyncio loop"),
    ("granian-asgi", "granian, ASGI, 1 worker, asyncio loop"),
]


async def asgi_hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Hello world as an ASGI app (lifespan events are acknowledged, nothing more)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": HELLO})


async def rsgi_hello(scope: Any, protocol: Any) -> None:
    """Hello world as a granian RSGI app."""
    protocol.response_bytes(200, [("content-type", "text/plain")], HELLO)


def command(stack: str, port: int) -> list[str]:
    """The command line that serves hello world on `stack` at 127.0.0.1:`port`."""
    bin_dir = Path(sys.executable).parent
    if stack == "ours":
        return [sys.executable, "-m", "benchmarks.http_servers", "ours", "--port", str(port)]
    if stack == "uvicorn":
        return [
            str(bin_dir / "uvicorn"),
            "benchmarks.http_servers:asgi_hello",
            *("--host", "127.0.0.1", "--port", str(port), "--loop", "asyncio", "--http", "httptools"),
            *("--lifespan", "off", "--no-access-log", "--log-level", "warning"),
        ]
    interface = stack.removeprefix("granian-")
    return [
        str(bin_dir / "granian"),
        f"benchmarks.http_servers:{interface}_hello",
        *("--interface", interface, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--loop", "asyncio", "--http", "1", "--no-ws", "--log-level", "warning", "--no-access-log"),
    ]


async def _ours(port: int) -> None:
    from eventfn.config import HttpSettings
    from eventfn.fronts.http.server import HttpServer
    from eventfn.web import Request, Response

    response = Response(200, [("Content-Type", "text/plain")], HELLO)

    async def app(request: Request) -> Response:
        return response

    server = HttpServer(HttpSettings(host="127.0.0.1", port=port, max_connections=10_000), app)
    listener = await server.bind()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.stop)
    await server.run(listener)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_servers")
    parser.add_argument("stack", choices=["ours"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(_ours(args.port))


if __name__ == "__main__":
    main()
