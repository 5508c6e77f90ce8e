"""Scenarios 1-3 of issues 5 and 13: drain a preloaded backlog, end-to-end latency at a fixed rate, sync invoke.

Each contender runs in its own process against the same nats-server and the same stored events: the raw
nats-py ceiling (`ceiling`), FastStream (`peer`) and one `eventfn serve` hosting a function per variant
(isolation x batch size). Throughput and latency are always reported beside the ceiling of the same run, and so
is CPU per event (`benchmarks.cpu`): the service process alone, its workers, and the contender's process, over
the span each measurement runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec

from benchmarks import cpu, functions, stream
from benchmarks.cpu import Usage
from benchmarks.functions import INPROCESS, PROCESS
from benchmarks.harness import Bench, child_result, median, percentile, wait_until, with_child
from benchmarks.report import Target

DRAIN_SUBJECT = "events.bench.drain"
ECHO_SUBJECT = "bench.echo"
RAW_CONSUMER = "raw nats-py consumer"
RAW_REPLY = "raw nats-py request/reply"


#: Workers a process-isolated function keeps warm where a scenario is about warm throughput: its concurrency.
WARM = 10


@dataclass(frozen=True)
class Variant:
    """One eventfn function under test. `min_warm` None: the function's default; `warmed`: the harness brings up
    its workers (sync invokes) before the clock starts; otherwise its pool grows under the load itself."""

    name: str
    isolation: str
    batch: int
    min_warm: int | None = None
    warmed: bool = True

    @property
    def label(self) -> str:
        mode = "process" if self.isolation == PROCESS else "in-process"
        grows = "" if self.warmed else f", pool scaling up from min_warm {self.min_warm}"
        return f"eventfn {mode}, batch {self.batch}{grows}"

    @property
    def consumer(self) -> str:
        return f"{self.name}--t0"

    @property
    def kick(self) -> str:
        # eventfn's mapping consumers also take their redrive subject: a kick there reaches only this one.
        return f"eventfn.redrive.{self.consumer}"


DRAIN = [
    Variant("drain_i1", INPROCESS, 1),
    Variant("drain_i100", INPROCESS, 100),
    Variant("drain_p1", PROCESS, 1, min_warm=WARM),
    Variant("drain_p100", PROCESS, 100, min_warm=WARM),
]
LATENCY = [
    Variant("lat_p1", PROCESS, 1, min_warm=WARM),
    Variant("lat_i1", INPROCESS, 1),
    Variant("lat_p100", PROCESS, 100, min_warm=WARM),
    # Not warmed: the first events find no worker (or the one that validated the version) and the pool must grow
    # under the 2,000/s load, as an idle function's does when traffic arrives.
    Variant("lat_p1_up", PROCESS, 1, min_warm=0, warmed=False),
]
SYNC = [Variant("sync_p", PROCESS, 1, min_warm=WARM), Variant("sync_i", INPROCESS, 1)]

#: Issue 13's drain targets, as a share of the ceiling.
DRAIN_TARGETS = {(INPROCESS, 1): 0.4, (INPROCESS, 100): 0.85, (PROCESS, 1): 0.25, (PROCESS, 100): 0.7}
#: Issue 13: FastStream per message, times this, at batch 1.
PEER_FACTOR = 4.0
#: Issue 13: the service's CPU per event at batch 1, at most this many times the raw consumer's.
CPU_FACTOR = 3.0
#: Issue 13: sync invoke round trips, at least this share of raw request/reply.
SYNC_SHARE = 0.7


def reports_dir(handlers: Path, v: Variant) -> Path:
    """Where a reporter function notes its events (beside the handler directory, not watched)."""
    return handlers.parent / "reports" / v.name


def write_functions(handlers: Path) -> None:
    """The main `eventfn serve`'s functions: drains (paused until their turn), reporters, sync no-ops."""
    functions.handler_dir(handlers)
    for v in DRAIN:
        block = functions.settings_block(
            isolation=v.isolation, subject=DRAIN_SUBJECT, batch_size=v.batch, enabled=False, min_warm=v.min_warm
        )
        functions.no_op(handlers, v.name, block)
    for v in LATENCY:
        subject = f"events.bench.lat.{v.name}"
        block = functions.settings_block(
            isolation=v.isolation, subject=subject, batch_size=v.batch, min_warm=v.min_warm
        )
        functions.reporter(handlers, v.name, reports_dir(handlers, v), block)
    for v in SYNC:
        functions.no_op(handlers, v.name, functions.settings_block(isolation=v.isolation, min_warm=v.min_warm))


async def function_infos(bench: Bench) -> dict[str, dict[str, Any]]:
    """What `eventfn functions` says of each function (state, workers, ...), by name."""
    reply = await bench.nc.request("eventfn.api.functions", b"", timeout=10)
    return {info["name"]: info for info in msgspec.json.decode(reply.data)}


async def availability(bench: Bench) -> dict[str, str | None]:
    """Per isolation mode: None if its functions loaded, else why not (the service's own error)."""
    infos = await function_infos(bench)
    out: dict[str, str | None] = {}
    for isolation in (PROCESS, INPROCESS):
        names = [v.name for v in DRAIN + LATENCY + SYNC if v.isolation == isolation]
        broken = [infos[n] for n in names if n not in infos or infos[n]["state"] != "Active"]
        out[isolation] = None if not broken else str(broken[0].get("last_error") or broken[0]["state"])
    return out


async def warm(bench: Bench, function: str, count: int = WARM) -> None:
    """Bring up `count` warm workers (the function's default concurrency) before the clock starts: its `min_warm`
    asks for them already; this makes sure of it whatever the engine does with `min_warm`."""
    request = functools.partial(bench.nc.request, f"eventfn.invoke.{function}", b"{}", timeout=30)
    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(request)


def unavailable(reason: str | None) -> str:
    """Why an isolation mode's figures are missing, in a table cell's worth of words."""
    if not reason:
        return "not loaded"
    short = reason.splitlines()[0].split("invalid setting: ", 1)[-1].split(" (see ", 1)[0]
    return f"`eventfn serve` rejected it: {short[:120]}"


# -- 1. drain ------------------------------------------------------------------------------------------------


def _window(bench: Bench, *, serve: bool, contender: int | None = None) -> cpu.Window:
    """A CPU window opened now: the main `eventfn serve` and its workers, or a contender's process; and the run's
    nats-server, as context."""
    others = {"contender": contender, "nats-server": bench.nats_pid}
    return cpu.Window(bench.serve_pid if serve else None, others).start()


def cpu_per_event(usage: Usage, events: int) -> dict[str, Any]:
    """A window's CPU as µs per event: the service, its workers, both, the contender, nats-server."""

    def us(seconds: float | None) -> float | None:
        return None if seconds is None else cpu.per_event_us(seconds, events)

    return {
        "service": us(usage.service),
        "workers": us(usage.workers),
        "total": us(usage.service + usage.workers),
        "contender": us(usage.others.get("contender")),
        "nats-server": us(usage.others.get("nats-server")),
        "events": events,
        "seconds": usage.seconds,
        "exited_uncovered": usage.uncovered,
    }


def _median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return median(values) if values else None


def _nats_note(used: dict[str, Any]) -> str:
    n = used.get("nats-server")
    return "" if n is None else f"nats-server meanwhile: {n:,.1f} µs/event"


def cpu_rows(
    bench: Bench,
    scenario: str,
    label: str,
    used: dict[str, Any] | None,
    *,
    ceiling: float | None,
    ceiling_what: str,
    isolation: str,
    target: Target | None,
    note: str = "",
) -> None:
    """CPU per event of one eventfn variant: the service process, its workers (process isolation), and both,
    beside the ceiling process's CPU per event; `target` is on the service's figure."""
    unit = "µs/event"
    if used is None:
        bench.row(scenario, f"{label}: service CPU", None, unit, target=target, note=note)
        return
    context = _nats_note(used)
    bench.row(
        scenario, f"{label}: service CPU", used["service"], unit, ceiling=ceiling, ceiling_what=ceiling_what,
        target=target, note=context,
    )  # fmt: skip
    if isolation == PROCESS:
        bench.row(scenario, f"{label}: workers' CPU", used["workers"], unit, ceiling=ceiling, ceiling_what=ceiling_what)
    bench.row(scenario, f"{label}: total CPU", used["total"], unit, ceiling=ceiling, ceiling_what=ceiling_what)


def _cpu_target(what: str) -> Target:
    return Target(text=f"service ≤ {CPU_FACTOR:g}x {what}", rule="ratio_at_most", bound=CPU_FACTOR)


async def drain(bench: Bench, available: dict[str, str | None]) -> None:
    """Scenario 1: N small JSON events preloaded; time until every one is acknowledged, and the CPU it took."""
    nc, n = bench.nc, bench.sizes.drain
    took = await stream.preload(nc, DRAIN_SUBJECT, n)
    last = await stream.last_sequence(nc, DRAIN_SUBJECT)
    bench.say(f"1. drain: {n:,} events preloaded in {took:.1f} s")

    async def rate(consumer: str, kick: str, window: cpu.Window) -> tuple[float, dict[str, Any]]:
        seconds = await stream.timed_drain(nc, consumer, kick=kick, last_seq=last, timeout=n / 300 + 60)
        return n / seconds, cpu_per_event(window.stop(), n)

    async def in_child(name: str, module: str, *args: str) -> tuple[float, dict[str, Any]]:
        await stream.create_consumer(nc, name, DRAIN_SUBJECT)
        child = bench.child(module, *args)

        async def timed() -> tuple[float, dict[str, Any]]:
            return await rate(name, stream.kick_subject(name), _window(bench, serve=False, contender=child.pid))

        value, _ = await with_child(child, timed)
        return value

    async def ceiling_once(i: int) -> tuple[float, dict[str, Any]]:
        return await in_child(f"ceiling-{i}", "ceiling", "drain", "--consumer", f"ceiling-{i}")

    async def faststream(batched: bool) -> tuple[float, dict[str, Any]]:
        name = f"faststream-{'batch' if batched else 'each'}"
        mode = ["--batched"] if batched else []
        return await in_child(name, "peer", "--subject", DRAIN_SUBJECT, "--durable", name, "--batch", "100", *mode)

    # The ceiling runs first, in the middle and last: the machine's speed drifts, the median holds.
    ceiling_runs = [await ceiling_once(0)]
    peer_each, peer_each_cpu = await faststream(batched=False)
    peer_batch, peer_batch_cpu = await faststream(batched=True)
    ceiling_runs.append(await ceiling_once(1))
    ours: dict[Variant, float | None] = {}
    ours_cpu: dict[Variant, dict[str, Any] | None] = {}
    for v in DRAIN:
        ours[v] = ours_cpu[v] = None
        if available[v.isolation] is None:
            await warm(bench, v.name)
            ours[v], ours_cpu[v] = await rate(v.consumer, v.kick, _window(bench, serve=True))
            used = ours_cpu[v] or {}
            bench.say(
                f"1. drain: {v.label}: {ours[v]:,.0f} events/s; CPU µs/event: service {used['service']:.1f}, "
                f"workers {used['workers']:.1f}"
            )
    ceiling_runs.append(await ceiling_once(2))
    ceilings = [r for r, _ in ceiling_runs]
    ceiling = median(ceilings)
    ceiling_cpu = [c for _, c in ceiling_runs]
    ceiling_us = _median_of(ceiling_cpu, "contender")
    bench.raw["drain"] = {
        "events": n,
        "ceiling_runs": ceilings,
        "faststream": {"per message": peer_each, "batch 100": peer_batch},
        "eventfn": {v.label: r for v, r in ours.items()},
        "cpu_us_per_event": {
            "ceiling_runs": ceiling_cpu,
            "faststream": {"per message": peer_each_cpu, "batch 100": peer_batch_cpu},
            "eventfn": {v.label: c for v, c in ours_cpu.items()},
        },
    }

    spread = f"median of {len(ceilings)}: " + ", ".join(f"{c:,.0f}" for c in ceilings)
    bench.row("1 drain", "raw nats-py pipelined consumer (the ceiling)", ceiling, "events/s", note=spread)
    bench.bar("drain", "ceiling: raw nats-py", ceiling, "ceiling")
    for label, peer in (("FastStream, per message", peer_each), ("FastStream, batch 100", peer_batch)):
        bench.row("1 drain", label, peer, "events/s", ceiling=ceiling, ceiling_what=RAW_CONSUMER)
        bench.bar("drain", label, peer, "peer")
    for v, r in ours.items():
        share = DRAIN_TARGETS[(v.isolation, v.batch)]
        target = Target(text=f"≥ {100 * share:.0f}% of the ceiling", rule="ratio_at_least", bound=share)
        note = "" if r is not None else unavailable(available[v.isolation])
        bench.row(
            "1 drain", v.label, r, "events/s", ceiling=ceiling, ceiling_what=RAW_CONSUMER, target=target, note=note
        )
        bench.bar("drain", v.label, r, "eventfn")
    for v, r in ours.items():
        if v.batch == 1:
            peer, what, target = (
                peer_each,
                "FastStream per message",
                Target(text=f"≥ {PEER_FACTOR:g}x FastStream per message", rule="ratio_at_least", bound=PEER_FACTOR),
            )
        else:
            peer, what, target = (
                peer_batch,
                "FastStream batch 100",
                Target(text="ahead of FastStream batched", rule="ratio_at_least", bound=1.0),
            )
        note = "" if r is not None else unavailable(available[v.isolation])
        bench.row("1 drain vs peer", v.label, r, "events/s", ceiling=peer, ceiling_what=what, target=target, note=note)

    scenario = "1 drain · CPU per event"
    runs = ", ".join(f"{c['contender']:,.1f}" for c in ceiling_cpu if c["contender"] is not None)
    context = _nats_note({"nats-server": _median_of(ceiling_cpu, "nats-server")})
    bench.row(
        scenario, "raw nats-py pipelined consumer (the ceiling): its process", ceiling_us, "µs/event",
        note=f"median of {runs}; {context}",
    )  # fmt: skip
    for label, used in (("FastStream, per message", peer_each_cpu), ("FastStream, batch 100", peer_batch_cpu)):
        bench.row(
            scenario, f"{label}: its process", used["contender"], "µs/event", ceiling=ceiling_us,
            ceiling_what=RAW_CONSUMER, note=_nats_note(used),
        )  # fmt: skip
    for v, variant_used in ours_cpu.items():
        cpu_rows(
            bench, scenario, v.label, variant_used, ceiling=ceiling_us, ceiling_what=RAW_CONSUMER,
            isolation=v.isolation,
            target=_cpu_target("the raw consumer's") if v.batch == 1 else None,
            note="" if variant_used is not None else unavailable(available[v.isolation]),
        )  # fmt: skip


# -- 2. end-to-end latency -----------------------------------------------------------------------------------


async def _publish(bench: Bench, subject: str) -> dict[str, Any]:
    """Publish at the run's rate for its duration, from a process of its own."""
    s = bench.sizes
    args = ["publish", "--subject", subject, "--rate", str(s.rate), "--seconds", str(s.latency_seconds)]
    return await child_result(bench.child("load", *args), timeout=s.latency_seconds + 60)


async def _ceiling_latency(bench: Bench) -> dict[str, Any]:
    subject, name = "events.bench.lat.ceiling", "ceiling-latency"
    await stream.create_consumer(bench.nc, name, subject, paused=False)
    child = bench.child("ceiling", "latency", "--consumer", name)
    used: dict[str, Any] = {}

    async def publish_and_settle() -> dict[str, Any]:
        window = _window(bench, serve=False, contender=child.pid)
        published = await _publish(bench, subject)
        last = await stream.last_sequence(bench.nc, subject)
        await wait_until(functools.partial(stream.acked_up_to, bench.nc, name, last), timeout=60)
        used.update(cpu_per_event(window.stop(), published["sent"]))
        return published

    published, result = await with_child(child, publish_and_settle)
    span = max(result["last"] - result["first"], published["seconds"])
    return {
        "latencies": result["latencies"],
        "sent": published["sent"],
        "rate": len(result["latencies"]) / span,
        "cpu_us_per_event": used,
    }


async def _eventfn_latency(bench: Bench, handlers: Path, v: Variant) -> dict[str, Any]:
    reports = reports_dir(handlers, v)
    if v.warmed:
        await warm(bench, v.name)
    workers_before = (await function_infos(bench))[v.name]["workers"]
    window = _window(bench, serve=True)
    published = await _publish(bench, f"events.bench.lat.{v.name}")
    pairs: list[tuple[float, float]] = []

    async def all_in() -> bool:
        pairs[:] = functions.read_reports(reports)
        return len(pairs) >= int(published["sent"])

    try:
        await wait_until(all_in, timeout=30, interval=0.1)
    except TimeoutError:
        bench.say(f"2. latency: {v.label}: {len(pairs)} of {published['sent']} events reported in time")
    used = cpu_per_event(window.stop(), len(pairs))
    workers_after = (await function_infos(bench))[v.name]["workers"]
    latencies = [received - ts for ts, received in pairs]
    first = min((ts for ts, _ in pairs), default=0.0)
    last = max((received for _, received in pairs), default=0.0)
    span = max(last - first, published["seconds"])
    return {
        "latencies": latencies,
        "sent": published["sent"],
        "rate": len(latencies) / span,
        "cpu_us_per_event": used,
        "workers_before": workers_before,
        "workers_after": workers_after,
    }


def _latency_stats(latencies: list[float]) -> dict[str, float]:
    """p50, p99 and max, in milliseconds."""
    return {
        "p50": percentile(latencies, 50) * 1e3,
        "p99": percentile(latencies, 99) * 1e3,
        "max": max(latencies, default=float("nan")) * 1e3,
    }


async def latency(bench: Bench, handlers: Path, available: dict[str, str | None]) -> None:
    """Scenario 2: publish at a fixed rate with timestamps in the events; publish-to-handler latency."""
    s = bench.sizes
    ceiling = await _ceiling_latency(bench)
    measured = {v: None if available[v.isolation] else await _eventfn_latency(bench, handlers, v) for v in LATENCY}
    bench.raw["latency"] = {
        "rate": s.rate,
        "seconds": s.latency_seconds,
        "ceiling": ceiling,
        "eventfn": {v.label: m for v, m in measured.items()},
    }
    scenario = f"2 latency @{s.rate:,}/s"
    ceiling_stats = _latency_stats(ceiling["latencies"])
    bench.row(scenario, "raw nats-py consumer (the ceiling): events/s", ceiling["rate"], "events/s")
    for key, value in ceiling_stats.items():
        bench.row(scenario, f"raw nats-py consumer (the ceiling): {key}", value, "ms")
        bench.bar(f"latency {key}", "ceiling: raw nats-py", value, "ceiling")
    p99_target = Target(text="≤ 3x the ceiling's p99", rule="ratio_at_most", bound=3.0)
    for v, m in measured.items():
        if m is None:
            note = unavailable(available[v.isolation])
            bench.row(scenario, f"{v.label}", None, "ms", target=p99_target, note=note)
            bench.bar("latency p50", v.label, None, "eventfn")
            continue
        note = f"{len(m['latencies']):,} of {m['sent']:,} events reported"
        if v.isolation == PROCESS:
            note += f"; workers {m['workers_before']} before, {m['workers_after']} after"
        rate = m["rate"]
        bench.row(
            scenario,
            f"{v.label}: events/s",
            rate,
            "events/s",
            ceiling=ceiling["rate"],
            ceiling_what=RAW_CONSUMER,
            note=note,
        )
        for key, value in _latency_stats(m["latencies"]).items():
            target = p99_target if key == "p99" else None
            bench.row(
                scenario, f"{v.label}: {key}", value, "ms", ceiling=ceiling_stats[key], ceiling_what=RAW_CONSUMER,
                target=target,
            )  # fmt: skip
            bench.bar(f"latency {key}", v.label, value, "eventfn")

    cpu_scenario = f"{scenario} · CPU per event"
    ceiling_us = ceiling["cpu_us_per_event"]["contender"]
    bench.row(
        cpu_scenario, "raw nats-py consumer (the ceiling): its process", ceiling_us, "µs/event",
        note=_nats_note(ceiling["cpu_us_per_event"]),
    )  # fmt: skip
    for v, m in measured.items():
        cpu_rows(
            bench, cpu_scenario, v.label, None if m is None else m["cpu_us_per_event"], ceiling=ceiling_us,
            ceiling_what=RAW_CONSUMER, isolation=v.isolation,
            target=_cpu_target("the raw consumer's") if v.batch == 1 and v.warmed else None,
            note="" if m is not None else unavailable(available[v.isolation]),
        )  # fmt: skip


# -- 3. sync invoke --------------------------------------------------------------------------------------------


async def _requests(bench: Bench, subject: str, *, serve: bool, responder: int | None = None) -> dict[str, Any]:
    """Round trips from the run's number of concurrent clients, from a process of their own; with the CPU the
    service and its workers (`serve`) or the `responder` process spend while they are counted."""
    s = bench.sizes
    args = ["request", "--subject", subject, "--clients", str(s.clients), "--seconds", str(s.sync_seconds)]
    load = bench.child("load", *args, "--warmup", "1.0", "--marks")

    async def measured() -> cpu.Usage:
        await load.expect("measuring", timeout=60)
        window = _window(bench, serve=serve, contender=responder)
        await load.expect("measured", timeout=s.sync_seconds + 60)
        return window.stop()

    usage, result = await with_child(load, measured, timeout=s.sync_seconds + 60)
    result["rate"] = result["count"] / result["seconds"]
    result["cpu_us_per_event"] = cpu_per_event(usage, result["count"])
    return result


def _sync_stats(result: dict[str, Any]) -> dict[str, tuple[float, str]]:
    latencies = result["latencies"]
    return {
        "round trips/s": (result["rate"], "req/s"),
        "p50": (percentile(latencies, 50) * 1e3, "ms"),
        "p99": (percentile(latencies, 99) * 1e3, "ms"),
    }


async def sync_invoke(bench: Bench, available: dict[str, str | None]) -> None:
    """Scenario 3: request/reply round trips with several concurrent clients, against a raw responder."""
    s = bench.sizes
    responder = bench.child("ceiling", "respond", "--subject", ECHO_SUBJECT)

    async def against_responder() -> dict[str, Any]:
        return await _requests(bench, ECHO_SUBJECT, serve=False, responder=responder.pid)

    ceiling, _ = await with_child(responder, against_responder)
    measured = {
        v: None if available[v.isolation] else await _requests(bench, f"eventfn.invoke.{v.name}", serve=True)
        for v in SYNC
    }
    bench.raw["sync"] = {"clients": s.clients, "ceiling": ceiling, "eventfn": {v.label: m for v, m in measured.items()}}
    scenario = f"3 sync invoke, {s.clients} clients"
    ceiling_stats = _sync_stats(ceiling)
    for key, (value, unit) in ceiling_stats.items():
        bench.row(scenario, f"raw nats-py request/reply (the ceiling): {key}", value, unit)
        bench.bar(_sync_panel(key), "ceiling: raw nats-py", value, "ceiling")
    share = Target(text=f"≥ {100 * SYNC_SHARE:.0f}% of raw request/reply", rule="ratio_at_least", bound=SYNC_SHARE)
    for v, m in measured.items():
        label = "eventfn process" if v.isolation == PROCESS else "eventfn in-process"
        if m is None:
            bench.row(scenario, label, None, "req/s", target=share, note=unavailable(available[v.isolation]))
            bench.bar(_sync_panel("round trips/s"), label, None, "eventfn")
            continue
        for key, (value, unit) in _sync_stats(m).items():
            note = f"{m['errors']} errors" if m["errors"] and unit == "req/s" else ""
            ceiling_value = ceiling_stats[key][0]
            bench.row(
                scenario, f"{label}: {key}", value, unit, ceiling=ceiling_value, ceiling_what=RAW_REPLY, note=note,
                target=share if unit == "req/s" else None,
            )  # fmt: skip
            bench.bar(_sync_panel(key), label, value, "eventfn")

    cpu_scenario = f"{scenario} · CPU per round trip"
    ceiling_us = ceiling["cpu_us_per_event"]["contender"]
    bench.row(
        cpu_scenario, "raw nats-py responder (the ceiling): its process", ceiling_us, "µs/event",
        note=_nats_note(ceiling["cpu_us_per_event"]),
    )  # fmt: skip
    for v, m in measured.items():
        label = "eventfn process" if v.isolation == PROCESS else "eventfn in-process"
        cpu_rows(
            bench, cpu_scenario, label, None if m is None else m["cpu_us_per_event"], ceiling=ceiling_us,
            ceiling_what="raw nats-py responder", isolation=v.isolation, target=None,
            note="" if m is not None else unavailable(available[v.isolation]),
        )  # fmt: skip


def _sync_panel(key: str) -> str:
    return "sync req/s" if key.endswith("/s") else f"sync ms {key}"
