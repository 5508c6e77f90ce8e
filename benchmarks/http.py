"""`python -m benchmarks.http [--quick] [--out DIR]`: the HTTP stack, chosen by measurement, on this machine in one run.

1. Hello world (a constant 13-byte answer) on each candidate stack (`benchmarks.http_servers`): eventfn's own
   `HttpServer` (an asyncio protocol on httptools), uvicorn with httptools (ASGI, asyncio loop), and granian
   (1 worker, asyncio loop; its RSGI interface and ASGI).
2. A function URL on `eventfn serve`: `GET /fn/hello/` to a trivial handler (process isolation, defaults),
   beside the raw NATS request/reply to the same handler (`eventfn.invoke.hello` from nats-py, as the sync-invoke
   benchmark sends it): what HTTP adds to an invocation.

The load: `--procs` processes of `benchmarks.http_load`, each with `--connections` keep-alive connections on raw
sockets, a new request as soon as the last is answered; all start together, warm up, then count answers and
their latencies for a fixed time. By default 8 requests are in flight everywhere: against the function that keeps
under its default concurrency of 10 (as in the sync-invoke benchmark; more would be throttled), over HTTP and over
NATS (`benchmarks.load request`, 8 clients) alike, and hello world is driven the same. Besides req/s and
latency, the server's own CPU time per request (its process and descendants, those that exit included:
`benchmarks.cpu`) says what each stack costs whatever the load generator takes from a shared machine.

Starts its own nats-server. Writes `http.json` and `http.md` into DIR (default: benchmarks/results); the table
also goes to stdout. Hello world runs two rounds (the second in reverse order) and each stack's best counts: other
work on a shared machine only ever slows a round down. About 80 s on 2 cores; `--quick` (one round, shorter)
about 30 s.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import nats

from benchmarks import cpu, report
from benchmarks.child import Child
from benchmarks.harness import child_result, percentile
from benchmarks.http_servers import HELLO, STACKS, command
from benchmarks.report import Row, evaluate
from eventfn.testing import NatsServer, Serve, write_handler

FUNCTION = "hello"
HANDLER = """
    # /// eventfn
    # description = "Answers hello: the function URL benchmark's function."
    # min_warm = 10
    # ///
    def handler(event, context):
        return {"statusCode": 200, "headers": {"content-type": "text/plain"}, "body": "Hello, world!"}
"""
#: Requests in flight against the function, over HTTP and over NATS alike: under its default concurrency (10), as
#: the sync-invoke benchmark has it, so that none is throttled.
FUNCTION_IN_FLIGHT = 8
_ROOT = Path(__file__).parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _get(port: int, path: str) -> tuple[int, bytes]:
    """One GET on a fresh connection: (status, body)."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        await stream.send(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        with anyio.fail_after(30):
            try:
                while chunk := await stream.receive():
                    raw += chunk
            except anyio.EndOfStream:
                pass
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head[9:12]), body


async def _until_listening(port: int, process: anyio.abc.Process, log: Path) -> None:
    with anyio.fail_after(30):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"the server exited ({process.returncode}); see {log}")
            try:
                await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                return
            except OSError:
                await anyio.sleep(0.05)  # nothing to await: the server says nothing when it listens


class Load:
    """How hard and how long to push: `procs` x `connections` in flight, after `warmup` s, for `seconds`."""

    def __init__(self, procs: int, connections: int, warmup: float, seconds: float) -> None:
        self.procs = procs
        self.connections = connections
        self.warmup = warmup
        self.seconds = seconds

    @property
    def in_flight(self) -> int:
        return self.procs * self.connections


async def measure(load: Load, port: int, path: str, server_pid: int, work: Path, name: str) -> dict[str, Any]:
    """Drive `path` at 127.0.0.1:`port` with `load`; req/s, latency percentiles and the server's CPU per request."""
    begin = time.time() + 1.0 + 0.3 * load.procs  # the load processes start meanwhile
    args = [
        *("--port", str(port), "--path", path, "--connections", str(load.connections)),
        *("--begin", repr(begin), "--warmup", str(load.warmup), "--seconds", str(load.seconds)),
    ]
    logs = work / "logs"
    results: list[dict[str, Any]] = []
    spent: list[float] = []

    async def one(i: int) -> None:
        child = Child("benchmarks.http_load", args, logs / f"http_load-{name}-{i}.log")
        results.append(await child_result(child, timeout=load.warmup + load.seconds + 60))

    async def clock() -> None:  # the server's CPU time (its process and descendants) over the measured window only
        await anyio.sleep(max(0.0, begin + load.warmup - time.time()))
        window = cpu.Window(server_pid).start()
        await anyio.sleep(max(0.0, begin + load.warmup + load.seconds - time.time()))
        usage = window.stop()
        spent.append(usage.service + usage.workers)

    async with anyio.create_task_group() as tg:
        for i in range(load.procs):
            tg.start_soon(one, i)
        tg.start_soon(clock)
    latencies = sorted(v / 1e6 for r in results for v in r["latencies_us"])
    statuses: dict[str, int] = {}
    for r in results:
        for status, n in r["statuses"].items():
            statuses[status] = statuses.get(status, 0) + n
    count = sum(r["count"] for r in results)
    return {
        "req_s": count / load.seconds,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "statuses": statuses,
        "reconnects": sum(r["reconnects"] for r in results),
        "server_cpu_us_per_req": 1e6 * spent[0] / count if count else None,
        "in_flight": load.in_flight,
    }


async def hello_world(stack: str, load: Load, work: Path) -> dict[str, Any]:
    """Scenario 1 on one stack: start its server, check it says hello, measure it, stop it."""
    port = _free_port()
    log = work / "logs" / f"server-{stack}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = await anyio.open_process(command(stack, port), stdout=out, stderr=out, cwd=_ROOT)
    try:
        await _until_listening(port, process, log)
        status, body = await _get(port, "/")
        if (status, body) != (200, HELLO):
            raise RuntimeError(f"{stack} answered {status} {body[:100]!r}, not hello world")
        return await measure(load, port, "/", process.pid, work, stack)
    finally:
        process.terminate()
        with anyio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def function_url(hello_load: Load, url: str, work: Path) -> dict[str, Any]:
    """Scenario 2: `GET /fn/hello/` on `eventfn serve`, then NATS request/reply to the same function."""
    procs = min(hello_load.procs, FUNCTION_IN_FLIGHT)
    load = Load(procs, FUNCTION_IN_FLIGHT // procs, hello_load.warmup, hello_load.seconds)
    handlers = work / "handlers"
    handlers.mkdir(parents=True, exist_ok=True)
    write_handler(handlers, FUNCTION, HANDLER)
    serve = Serve(handlers, url, work / "data", http_port=0)
    await serve.astart()
    try:
        nc = await nats.connect(url, name="bench-http")
        try:  # the function's warm workers, before any clock
            request = functools.partial(nc.request, f"eventfn.invoke.{FUNCTION}", b"{}", timeout=30)
            async with anyio.create_task_group() as tg:
                for _ in range(load.in_flight):
                    tg.start_soon(request)
        finally:
            await nc.close()
        assert serve.process is not None
        port = int(serve.http_url.rsplit(":", 1)[1])
        status, body = await _get(port, f"/fn/{FUNCTION}/")
        sys.stderr.write(f"  GET /fn/{FUNCTION}/ answers {status} {body[:60]!r}\n")
        http = await measure(load, port, f"/fn/{FUNCTION}/", serve.process.pid, work, "function-url")
        http["first_answer"] = [status, body[:200].decode(errors="replace")]
        sys.stderr.write(f"  {http['req_s']:,.0f} req/s; raw NATS request/reply to the same function ...\n")
        requester = Child(
            "benchmarks.load",
            [
                *("request", "--url", url, "--subject", f"eventfn.invoke.{FUNCTION}"),
                *("--clients", str(load.in_flight), "--seconds", str(load.seconds), "--warmup", str(load.warmup)),
            ],
            work / "logs" / "nats-request.log",
        )
        raw = await child_result(requester, timeout=load.warmup + load.seconds + 60)
        latencies = sorted(raw["latencies"])
        nats_result = {
            "req_s": raw["count"] / raw["seconds"],
            "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99),
            "errors": raw["errors"],
            "in_flight": load.in_flight,
        }
        return {"http": http, "nats": nats_result}
    finally:
        await serve.astop()


async def run(load: Load, work: Path, url: str, stacks: list[str], rounds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {stack: [] for stack in stacks}
    for n in range(rounds):  # every other round in reverse: no stack always runs first (or last) on a busy machine
        for stack in stacks if n % 2 == 0 else stacks[::-1]:
            sys.stderr.write(f"hello world on {stack} (round {n + 1} of {rounds}) ...\n")
            runs[stack].append(await hello_world(stack, load, work))
            sys.stderr.write(f"  {runs[stack][-1]['req_s']:,.0f} req/s\n")
    # Each stack's best round: other work on a shared machine only ever slows a round down.
    raw: dict[str, Any] = {"hello": {s: max(r, key=lambda x: x["req_s"]) for s, r in runs.items()}, "rounds": runs}
    sys.stderr.write(f"function URL on eventfn serve: GET /fn/{FUNCTION}/ ...\n")
    raw["function"] = await function_url(load, url, work)
    return raw


def rows(raw: dict[str, Any]) -> list[Row]:
    """Each stack beside ours; the function URL beside hello world on the same stack and beside raw NATS."""
    labels = dict(STACKS)
    hello, fn = raw["hello"], raw["function"]
    ours = hello.get("ours", {}).get("req_s")
    out = []
    for stack, result in hello.items():
        out.append(
            Row(
                scenario="hello world",
                what=labels[stack],
                figure=result["req_s"],
                unit="req/s",
                ceiling=ours if stack != "ours" else None,
                ceiling_what="eventfn HttpServer" if stack != "ours" else "",
            )
        )
    for stack, result in hello.items():
        if stack != "ours" and "ours" in hello:
            out.append(
                Row(
                    scenario="server CPU per request (lower is better)",
                    what=labels[stack],
                    figure=result["server_cpu_us_per_req"],
                    unit="µs",
                    ceiling=hello["ours"]["server_cpu_us_per_req"],
                    ceiling_what="eventfn HttpServer",
                )
            )
    statuses = ", ".join(f"{n:,} x {s}" for s, n in sorted(fn["http"]["statuses"].items()))
    out.append(
        Row(
            scenario="function URL",
            what=f"eventfn serve, GET /fn/{FUNCTION}/ vs hello world on the same stack",
            figure=fn["http"]["req_s"],
            unit="req/s",
            ceiling=ours,
            ceiling_what="eventfn HttpServer hello world",
            note=statuses,
        )
    )
    out.append(
        Row(
            scenario="function URL",
            what=f"eventfn serve, GET /fn/{FUNCTION}/ vs NATS request/reply to the same function",
            figure=fn["http"]["req_s"],
            unit="req/s",
            ceiling=fn["nats"]["req_s"],
            ceiling_what=f"nats-py request to eventfn.invoke.{FUNCTION}",
        )
    )
    if ours is not None:
        out.append(
            Row(
                scenario="server CPU per request (lower is better)",
                what=f"eventfn serve, GET /fn/{FUNCTION}/ (the service's process and its workers)",
                figure=fn["http"]["server_cpu_us_per_req"],
                unit="µs",
                ceiling=hello["ours"]["server_cpu_us_per_req"],
                ceiling_what="eventfn HttpServer hello world",
            )
        )
    return [evaluate(r) for r in out]


def _ms(value: float | None) -> str:
    return "—" if value is None or value != value else f"{value:.2f}"


def markdown(table: list[Row], raw: dict[str, Any], meta: dict[str, Any]) -> str:
    labels = dict(STACKS)
    lines = [
        "# eventfn HTTP benchmark",
        "",
        f"{meta['date']} · eventfn {meta['eventfn']} · {meta['machine']} · Python {meta['python']} · "
        f"{meta['procs']} load processes x {meta['connections']} keep-alive connections · {meta['warmup']:g} s "
        f"warm-up, {meta['seconds']:g} s measured, hello world the best of {meta['rounds']} rounds · "
        f"total {meta['total_seconds']:.0f} s · CPUs "
        f"{100 * meta['busy_before']:.0f}% busy with other work before the run",
        "",
        "| what | req/s | p50 ms | p99 ms | server CPU µs/req |",
        "|---|---|---|---|---|",
    ]

    def line(what: str, r: dict[str, Any]) -> str:
        cpu = r.get("server_cpu_us_per_req")
        cpu_text = "—" if cpu is None else f"{cpu:,.0f}"
        return f"| {what} | {r['req_s']:,.0f} | {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} | {cpu_text} |"

    for stack, result in raw["hello"].items():
        lines.append(line(f"hello world · {labels[stack]}", result))
    fn = raw["function"]
    status, body = fn["http"]["first_answer"]
    lines.append(
        line(
            f"function URL · `GET /fn/{FUNCTION}/` on eventfn serve (answers {status}; "
            f"{fn['http']['in_flight']} connections)",
            fn["http"],
        )
    )
    errors = fn["nats"]["errors"]
    lines.append(
        line(
            f"NATS request/reply · `eventfn.invoke.{FUNCTION}` (nats-py, {fn['nats']['in_flight']} clients"
            + (f"; {errors:,} errors" if errors else "")
            + ")",
            fn["nats"],
        )
    )
    lines += ["", "Ratios (figure / the same run's reference):", "", *report.ratio_table(table, percent=True), ""]
    if status == 501:
        lines += [
            f"The function URL front answered 501 (not built on this branch: `{body.strip()}`): the function URL row "
            "measures the server and routing only, no invocation.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    from benchmarks import __main__ as harness  # the revision

    parser = argparse.ArgumentParser(prog="python -m benchmarks.http", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="one round, 2 s per figure after 0.5 s warm-up (default: two, 5 s, 1 s)"
    )
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--connections", type=int, default=4, help="keep-alive connections per load process")
    parser.add_argument("--stacks", default=",".join(s for s, _ in STACKS), help="hello-world stacks to measure")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where results go")
    args = parser.parse_args()
    load = Load(args.procs, args.connections, 0.5 if args.quick else 1.0, 2.0 if args.quick else 5.0)
    busy = report.cpu_busy()
    if busy > 0.15:
        sys.stderr.write(f"warning: other work keeps {100 * busy:.0f}% of the CPUs busy; figures will be noisy\n")
    begin = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="eventfn-bench-http-"))
    try:
        with NatsServer(work / "nats") as server:
            raw = anyio.run(run, load, work, server.url, args.stacks.split(","), 1 if args.quick else 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = rows(raw)
    meta = report.run_meta(
        eventfn=harness._revision(),
        mode="quick" if args.quick else "full",
        rounds=1 if args.quick else 2,
        procs=load.procs,
        connections=load.connections,
        warmup=load.warmup,
        seconds=load.seconds,
        total_seconds=time.perf_counter() - begin,
        busy_before=busy,
    )
    report.save(args.out, "http", {"meta": meta, "raw": raw, "rows": table}, markdown(table, raw, meta))


if __name__ == "__main__":
    main()
