"""`python -m benchmarks.idle [--functions N] [--quick] [--out DIR]`: what idle functions cost, and their first event.

Issue 13's idle targets, on the code under test, beside references from the same run:

1. **Start-up and idle cost.** N trivial functions (a plain handler file each, no settings: whatever the defaults
   are) in one handler directory; `eventfn serve` on them. Seconds from starting the process until it logs
   `eventfn ready` (what `eventfn.testing.Serve` and every other benchmark wait for: the service logs it once
   every function has loaded and the watch, API and routers run). Then at idle: RSS and PSS (from
   /proc/<pid>/smaps_rollup) summed over the service and every descendant process, the number of processes, and
   the CPU the service and its descendants burn per second over a span of idle time. The reference: the same for
   a service with one function.
2. **First event of an idle function.** One sync invoke (a NATS request on `eventfn.invoke.<fn>`, as
   `eventfn invoke` sends it) to each of K of the idle functions, one after another: p50, p99 and max to the
   result. Whether those functions had a warm worker before is read from the service (`eventfn functions`).
3. **Cold start after scaling to zero.** K more functions with `min_warm = 0, idle_timeout = 1` added to the
   running service; once the service says none of them holds a worker, one sync invoke each. A true cold start
   on any code, even one that keeps a worker per idle function by default.
4. **References**: K invokes of one function whose worker is warm (the same service), and K round trips to a raw
   nats-py responder (request/reply through the same nats-server); the bare interpreter start is in scenario 4 of
   `python -m benchmarks`.

Starts its own nats-server. Writes `idle.json` and `idle.md` into DIR (default: benchmarks/results). With N = 1000
and scale to zero, about a minute; `--quick` (N = 100, K = 10, 3 s of idle) about 30 s. On code that starts a
worker per function, N = 1000 needs about 16 GB of memory: pick a smaller N there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
from nats.aio.client import Client

from benchmarks import cpu, functions, report
from benchmarks.child import Child
from benchmarks.harness import descendants, percentile, wait_until
from benchmarks.report import Row, Target, evaluate
from eventfn.testing import NatsServer, Serve, write_handler

#: What `eventfn serve` logs once it is ready (the same line `eventfn.testing.Serve` waits for).
READY = r"eventfn ready"
#: What it logs once the functions it let go live unvalidated at start-up are validated (past the first 64).
VALIDATED = r"validated the \d+ function\(s\) that went live at start-up unvalidated"
TRIVIAL = """
    def handler(event, context):
        return {"ok": True}
"""
#: The same with a settings block (from `functions.settings_block`).
SETTLED = """
    # /// eventfn
    {settings}
    # ///
    def handler(event, context):
        return {{"ok": True}}
"""
TARGET_READY_S = 3.0
TARGET_RSS_MB = 300.0
TARGET_COLD_MS = 20.0
TARGET_SPREAD = 2.0


def _memory(pids: list[int]) -> dict[str, float]:
    """RSS and PSS in MB summed over `pids` (from /proc/<pid>/smaps_rollup; a process gone meanwhile counts 0)."""
    rss = pss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return {"rss_mb": rss / 1024, "pss_mb": pss / 1024}


async def _functions(nc: Client) -> dict[str, dict[str, Any]]:
    reply = await nc.request("eventfn.api.functions", b"", timeout=30)
    return {info["name"]: info for info in msgspec.json.decode(reply.data)}


async def _invoke_ms(nc: Client, subject: str) -> float:
    """One request to `subject`, answered without an error: its round trip in milliseconds."""
    begin = time.perf_counter()
    reply = await nc.request(subject, b"{}", timeout=30)
    took = (time.perf_counter() - begin) * 1e3
    if reply.headers and reply.headers.get("Eventfn-Error"):
        raise RuntimeError(f"{subject} answered an error: {reply.headers['Eventfn-Error']}: {reply.data[:300]!r}")
    return took


def _stats(values: list[float]) -> dict[str, Any]:
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return {"p50": p50, "p99": p99, "max": max(values), "p99_over_p50": p99 / p50, "runs": values}


class Idle:
    """One `eventfn serve` on a handler directory, started and measured at idle."""

    def __init__(self, handlers: Path, url: str, data: Path) -> None:
        self.serve = Serve(handlers, url, data)
        self.pid = 0

    async def start(self, timeout: float) -> tuple[float, float]:
        """Start the service; the seconds until it logs `eventfn ready`, and until every function is validated
        (the same, unless it let some go live first and validated them once ready)."""
        begin = time.perf_counter()
        await self.serve.astart(wait_ready=False)
        assert self.serve.process is not None
        self.pid = self.serve.process.pid
        ready = await self.serve.log.await_line(READY, timeout=timeout)
        ready_s = time.perf_counter() - begin
        if "validated after start-up" in ready.string:
            await self.serve.log.await_line(VALIDATED, timeout=timeout)  # idle means after that
        return ready_s, time.perf_counter() - begin

    async def idle(self, seconds: float) -> dict[str, Any]:
        """Memory and processes at idle, and the CPU burnt per second over `seconds` of idle time."""
        window = cpu.Window(self.pid, interval=1.0).start()
        await anyio.sleep(seconds)  # the span measured: idle time itself, not a wait for an event
        usage = window.stop()
        pids = [self.pid, *descendants(self.pid)]
        service = _memory([self.pid])
        return {
            **_memory(pids),
            "service_rss_mb": service["rss_mb"],
            "processes": len(pids),
            "service_cpu_ms_per_s": 1e3 * usage.service / usage.seconds,
            "descendants_cpu_ms_per_s": 1e3 * usage.workers / usage.seconds,
            "idle_seconds": usage.seconds,
        }

    async def stop(self) -> None:
        await anyio.to_thread.run_sync(self.serve.stop)


async def _raw_round_trips(url: str, nc: Client, work: Path, count: int) -> list[float]:
    """`count` sequential round trips to a raw nats-py responder (`benchmarks.ceiling respond`)."""
    subject = "bench.idle.echo"
    child = Child("benchmarks.ceiling", ["respond", "--subject", subject, "--url", url], work / "logs" / "raw.log")
    await child.start()
    try:
        await _invoke_ms(nc, subject)  # the first round trip sets up the client's reply subscription
        return [await _invoke_ms(nc, subject) for _ in range(count)]
    finally:
        await child.finish()


async def run(work: Path, url: str, n: int, k: int, idle_seconds: float) -> dict[str, Any]:
    nc = await nats.connect(url, name="bench-idle")
    try:
        raw: dict[str, Any] = {"functions": n, "cold_functions": k, "idle_seconds": idle_seconds}

        # The reference: a service with one function.
        one = functions.handler_dir(work / "handlers-one")
        write_handler(one, "only", TRIVIAL)
        ref = Idle(one, url, work / "data-one")
        try:
            ready_s, _ = await ref.start(timeout=60)
            raw["one"] = {"ready_s": ready_s}
            sys.stderr.write(f"idle: 1 function ready in {raw['one']['ready_s']:.2f} s\n")
            raw["one"].update(await ref.idle(idle_seconds))
        finally:
            await ref.stop()

        # N functions, default settings.
        handlers = functions.handler_dir(work / "handlers")
        names = [f"idle_{i:04d}" for i in range(n)]
        for name in names:
            write_handler(handlers, name, TRIVIAL)
        many = Idle(handlers, url, work / "data")
        try:
            ready_s, validated_s = await many.start(timeout=60 + 0.5 * n)
            raw["many"] = {"ready_s": ready_s, "validated_s": validated_s}
            # What "ready" promised: how many functions the service could run (once validated) when it said so.
            states = [info["state"] for info in (await _functions(nc)).values()]
            raw["many"]["active_at_ready"] = states.count("Active")
            sys.stderr.write(f"idle: {n} functions ready in {raw['many']['ready_s']:.2f} s\n")
            raw["many"].update(await many.idle(idle_seconds))
            sys.stderr.write(f"idle: {raw['many']}\n")

            # The first event of K idle functions, spread over the directory.
            chosen = [names[i * n // k] for i in range(k)]
            infos = await _functions(nc)
            before = len(descendants(many.pid))
            firsts = [await _invoke_ms(nc, f"eventfn.invoke.{name}") for name in chosen]
            raw["first_invoke_ms"] = _stats(firsts)
            raw["first_invoke_ms"]["had_warm_worker"] = sum(1 for name in chosen if infos[name]["workers"] > 0)
            raw["first_invoke_ms"]["processes_added"] = len(descendants(many.pid)) - before
            raw["warm_invoke_ms"] = _stats([await _invoke_ms(nc, f"eventfn.invoke.{chosen[-1]}") for _ in range(k)])
            # Right after the warm invokes, so that both see the machine alike.
            raw["raw_round_trip_ms"] = _stats(await _raw_round_trips(url, nc, work, k))

            # Scaled to zero: K more functions that keep no worker once idle for a second.
            zero = [f"zero_{i:03d}" for i in range(k)]
            block = functions.settings_block(min_warm=0, idle_timeout=1)
            for name in zero:
                write_handler(handlers, name, SETTLED.format(settings=block))

            async def none_warm() -> bool:
                infos = await _functions(nc)
                return all(infos.get(z, {}).get("state") == "Active" and infos[z]["workers"] == 0 for z in zero)

            waited = time.perf_counter()
            await wait_until(none_warm, timeout=60 + k, interval=0.2)
            sys.stderr.write(f"idle: {k} functions scaled to zero after {time.perf_counter() - waited:.1f} s\n")
            raw["scaled_to_zero_ms"] = _stats([await _invoke_ms(nc, f"eventfn.invoke.{z}") for z in zero])
        finally:
            await many.stop()
        return raw
    finally:
        await nc.close()


def rows(raw: dict[str, Any]) -> list[Row]:
    n, k = raw["functions"], raw["cold_functions"]
    one, many = raw["one"], raw["many"]
    at_n = "" if n == 1000 else f" (the target is for 1,000 functions; this run has {n:,})"
    out = [
        Row(
            scenario=f"idle, {n:,} functions",
            what="serve start until `eventfn ready`",
            figure=many["ready_s"],
            unit="s",
            ceiling=one["ready_s"],
            ceiling_what="1 function",
            target=Target(text=f"≤ {TARGET_READY_S:g} s{at_n}", rule="figure_at_most", bound=TARGET_READY_S),
            note=f"{many['active_at_ready']:,} of {n:,} functions Active; "
            f"every one validated {many.get('validated_s', many['ready_s']):.1f} s after the start, and idle "
            "measured from then",
        ),
        Row(
            scenario=f"idle, {n:,} functions",
            what="total RSS at idle, the service and all its descendants",
            figure=many["rss_mb"],
            unit="MB",
            ceiling=one["rss_mb"],
            ceiling_what="1 function",
            target=Target(text=f"≤ {TARGET_RSS_MB:g} MB{at_n}", rule="figure_at_most", bound=TARGET_RSS_MB),
            note=f"the service alone {many['service_rss_mb']:.0f} MB; "
            f"{(many['rss_mb'] - one['rss_mb']) / max(1, n - 1):.2f} MB per function more",
        ),
        Row(
            scenario=f"idle, {n:,} functions",
            what="total PSS at idle",
            figure=many["pss_mb"],
            unit="MB",
            ceiling=one["pss_mb"],
            ceiling_what="1 function",
        ),
        Row(
            scenario=f"idle, {n:,} functions",
            what="processes at idle (the service and its descendants)",
            figure=many["processes"],
            unit="processes",
            ceiling=one["processes"],
            ceiling_what="1 function",
        ),
        Row(
            scenario=f"idle, {n:,} functions",
            what=f"service CPU at idle (over {many['idle_seconds']:.0f} s)",
            figure=many["service_cpu_ms_per_s"],
            unit="ms CPU/s",
            ceiling=one["service_cpu_ms_per_s"],
            ceiling_what="1 function",
            note=f"its descendants {many['descendants_cpu_ms_per_s']:.1f} ms CPU/s "
            f"(1 function: {one['descendants_cpu_ms_per_s']:.1f})",
        ),
    ]
    firsts = raw["first_invoke_ms"]
    warm = raw["warm_invoke_ms"]
    groups = (
        (
            f"first event of {k} idle functions (default settings)",
            firsts,
            f"{firsts['had_warm_worker']} of {k} had a warm worker before; {firsts['processes_added']} processes "
            "started",
        ),
        (f"cold start of {k} functions scaled to zero (min_warm 0, idle_timeout 1 s)", raw["scaled_to_zero_ms"], ""),
    )
    for what, stats, note in groups:
        for key in ("p50", "p99", "max"):
            target = None
            if key == "p50":
                target = Target(text=f"≤ {TARGET_COLD_MS:g} ms", rule="figure_at_most", bound=TARGET_COLD_MS)
            out.append(
                Row(
                    scenario="first result",
                    what=f"{what}: {key}",
                    figure=stats[key],
                    unit="ms",
                    ceiling=warm[key],
                    ceiling_what="a warm worker of the same service",
                    target=target,
                    note=note if key == "p50" else "",
                )
            )
        out.append(
            Row(
                scenario="first result",
                what=f"{what}: p99 / p50",
                figure=stats["p99_over_p50"],
                unit="x",
                ceiling=warm["p99_over_p50"],
                ceiling_what="a warm worker's p99 / p50",
                target=Target(text=f"≤ {TARGET_SPREAD:g}", rule="figure_at_most", bound=TARGET_SPREAD),
            )
        )
    rt = raw["raw_round_trip_ms"]
    for key in ("p50", "p99", "max"):
        out.append(
            Row(
                scenario="first result",
                what=f"a warm worker, {k} invokes: {key}",
                figure=warm[key],
                unit="ms",
                ceiling=rt[key],
                ceiling_what="raw nats-py request/reply",
            )
        )
    return [evaluate(row) for row in out]


METHOD = [
    "Ready: from starting `eventfn serve` (a subprocess, as `eventfn.testing.Serve` starts it) until it logs "
    "`eventfn ready`, which it does once every function has loaded and its watch, API and routers run.",
    "Memory: Rss and Pss of /proc/<pid>/smaps_rollup, summed over the service and every process descending from it "
    "(found by parent pid), read after the idle span. Idle CPU: utime + stime from /proc/<pid>/stat over the idle "
    "span (`benchmarks.cpu`, exited descendants counted).",
    "First result: sequential NATS requests on `eventfn.invoke.<fn>` from one nats-py client, timed from request to "
    "reply; a reply with an `Eventfn-Error` header fails the run. The warm reference invokes one function already "
    "invoked; the raw reference is `benchmarks.ceiling respond` through the same nats-server.",
]


def markdown(table: list[Row], meta: dict[str, Any]) -> str:
    out = [
        "# eventfn idle functions benchmark",
        "",
        f"{meta['date']} · eventfn {meta['eventfn']} · {meta['machine']} · Python {meta['python']} · "
        f"{meta['functions']:,} functions · total {meta['seconds']:.0f} s · CPUs {100 * meta['busy_before']:.0f}% "
        "busy with other work before the run",
        "",
        *report.table(table),
        "",
        "How it was measured:",
        "",
        *(f"- {line}" for line in METHOD),
        "",
    ]
    return "\n".join(out)


def main() -> None:
    from benchmarks import __main__ as harness  # the revision

    parser = argparse.ArgumentParser(prog="python -m benchmarks.idle", description=__doc__.splitlines()[0])
    parser.add_argument("--functions", type=int, default=None, help="idle functions (default 1000; quick: 100)")
    parser.add_argument("--cold", type=int, default=None, help="functions invoked cold (default 30; quick: 10)")
    parser.add_argument("--idle-seconds", type=float, default=None, help="idle span measured (default 10; quick: 3)")
    parser.add_argument("--quick", action="store_true", help="100 functions, 10 invoked cold, 3 s of idle")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where results go")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, stores)")
    args = parser.parse_args()
    n = args.functions or (100 if args.quick else 1000)
    k = args.cold or (10 if args.quick else 30)
    idle_seconds = args.idle_seconds or (3.0 if args.quick else 10.0)
    busy = report.cpu_busy()
    if busy > 0.15:
        sys.stderr.write(f"warning: other work keeps {100 * busy:.0f}% of the CPUs busy; figures will be noisy\n")
    begin = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="eventfn-bench-idle-"))
    try:
        with NatsServer(work / "nats") as server:
            raw = anyio.run(run, work, server.url, n, k, idle_seconds)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    table = rows(raw)
    meta = report.run_meta(
        eventfn=harness._revision(),
        functions=n,
        cold_functions=k,
        seconds=time.perf_counter() - begin,
        busy_before=busy,
    )
    report.save(args.out, "idle", {"meta": meta, "raw": raw, "rows": table}, markdown(table, meta))


if __name__ == "__main__":
    main()
