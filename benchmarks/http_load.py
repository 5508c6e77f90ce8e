"""The HTTP load generator: `connections` keep-alive connections on raw sockets in one process, each sending a
GET as soon as the answer to its last one is in (closed loop), counting answers and their latencies.

No asyncio and no HTTP library on the client's side: one `selectors` loop over non-blocking sockets and a
minimal response parser (status line, Content-Length), so that the client costs as little CPU as it can on a
machine it shares with the server. The harness runs several of these processes, all told the same wall-clock
`--begin`: each connects, waits for it, warms up for `--warmup` s, then measures for `--seconds` s.

Run as `python -m benchmarks.http_load --port P --path /x --connections C --begin T ...`; it prints `ready` once
connected and one `result <json>` line at the end (the protocol of `benchmarks.child`).
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import time
from array import array
from collections import Counter

from benchmarks import child


class _Conn:
    __slots__ = ("buffer", "sent_at", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.sent_at = 0.0


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def _response(buffer: bytes) -> tuple[int, int, bool] | None:
    """(status, bytes it takes, whether the server closes after it) of the first whole response in `buffer`."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[:end].lower()
    status = int(head[9:12])
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        raise RuntimeError(f"a response without Content-Length: {bytes(buffer[:end])!r}")
    line_end = head.find(b"\r\n", at + 2)
    length = int(head[at + 17 : line_end if line_end >= 0 else len(head)])
    total = end + 4 + length
    if len(buffer) < total:
        return None
    return status, total, b"\r\nconnection: close" in head


def run(args: argparse.Namespace) -> dict[str, object]:
    request = f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\nUser-Agent: eventfn-bench\r\n\r\n".encode()
    selector = selectors.DefaultSelector()
    conns = [_Conn(_connect(args.host, args.port)) for _ in range(args.connections)]
    for conn in conns:
        selector.register(conn.sock, selectors.EVENT_READ, conn)
    sys.stdout.write("ready\n")  # the protocol of benchmarks.child
    sys.stdout.flush()
    # Wall clock to this process's perf_counter: every load process starts and stops together.
    offset = time.perf_counter() - time.time()
    begin = args.begin + offset
    measure_from = begin + args.warmup
    end = measure_from + args.seconds
    while (now := time.perf_counter()) < begin:
        time.sleep(min(0.01, begin - now))
    latencies = array("d")
    statuses: Counter[int] = Counter()
    reconnects = 0
    for conn in conns:
        conn.sent_at = time.perf_counter()
        conn.sock.send(request)
    while (now := time.perf_counter()) < end:
        for key, _ in selector.select(timeout=min(0.1, end - now)):
            conn = key.data
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionError:
                data = b""
            closed = not data
            conn.buffer += data
            while (parsed := _response(conn.buffer)) is not None:
                status, taken, close = parsed
                conn.buffer = conn.buffer[taken:]
                done = time.perf_counter()
                if done >= measure_from:
                    latencies.append(done - conn.sent_at)
                    statuses[status] += 1
                closed = closed or close
                if closed:
                    break
                conn.sent_at = done
                conn.sock.send(request)
            if closed:  # the server closed the connection: a new one, as a client would
                selector.unregister(conn.sock)
                conn.sock.close()
                reconnects += 1
                conn.sock, conn.buffer = _connect(args.host, args.port), b""
                selector.register(conn.sock, selectors.EVENT_READ, conn)
                conn.sent_at = time.perf_counter()
                conn.sock.send(request)
    for conn in conns:
        conn.sock.close()
    return {
        "count": len(latencies),
        "seconds": args.seconds,
        "statuses": {str(k): v for k, v in statuses.items()},
        "reconnects": reconnects,
        # Microseconds, to keep the result line small.
        "latencies_us": [round(v * 1e6) for v in latencies],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_load")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--begin", type=float, required=True, help="wall-clock time (time.time()) to start sending")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    child.result(run(args))


if __name__ == "__main__":
    main()
