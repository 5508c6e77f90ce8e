"""Scenarios 1-3 of issue 5: drain a preloaded backlog, end-to-end latency at a fixed rate, sync invoke.

Each contender runs in its own process against the same nats-server and the same stored events: the raw
nats-py ceiling (`ceiling`), FastStream (`peer`) and one `eventfn serve` hosting a function per variant
(isolation x batch size). Throughput and latency are always reported beside the ceiling of the same run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec

from benchmarks import functions, stream
from benchmarks.functions import INPROCESS, PROCESS
from benchmarks.harness import Bench, child_result, median, percentile, wait_until, with_child
from benchmarks.report import Target

DRAIN_SUBJECT = "events.bench.drain"
ECHO_SUBJECT = "bench.echo"
RAW_CONSUMER = "raw nats-py consumer"
RAW_REPLY = "raw nats-py request/reply"


@dataclass(frozen=True)
class Variant:
    """One eventfn function under test."""

    name: str
    isolation: str
    batch: int

    @property
    def label(self) -> str:
        mode = "process" if self.isolation == PROCESS else "in-process"
        return f"eventfn {mode}, batch {self.batch}"

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
    Variant("drain_p1", PROCESS, 1),
    Variant("drain_p100", PROCESS, 100),
]
LATENCY = [Variant("lat_p1", PROCESS, 1), Variant("lat_i1", INPROCESS, 1), Variant("lat_p100", PROCESS, 100)]
SYNC = [Variant("sync_p", PROCESS, 1), Variant("sync_i", INPROCESS, 1)]

#: Issue 5's drain targets, as a share of the ceiling.
DRAIN_TARGETS = {(INPROCESS, 1): 0.5, (INPROCESS, 100): 0.8, (PROCESS, 1): 0.25, (PROCESS, 100): 0.6}


def reports_dir(handlers: Path, v: Variant) -> Path:
    """Where a reporter function notes its events (beside the handler directory, not watched)."""
    return handlers.parent / "reports" / v.name


def write_functions(handlers: Path) -> None:
    """The main `eventfn serve`'s functions: drains (paused until their turn), reporters, sync no-ops."""
    functions.handler_dir(handlers)
    for v in DRAIN:
        block = functions.settings_block(
            isolation=v.isolation, subject=DRAIN_SUBJECT, batch_size=v.batch, enabled=False
        )
        functions.no_op(handlers, v.name, block)
    for v in LATENCY:
        subject = f"events.bench.lat.{v.name}"
        block = functions.settings_block(isolation=v.isolation, subject=subject, batch_size=v.batch)
        functions.reporter(handlers, v.name, reports_dir(handlers, v), block)
    for v in SYNC:
        functions.no_op(handlers, v.name, functions.settings_block(isolation=v.isolation))


async def availability(bench: Bench) -> dict[str, str | None]:
    """Per isolation mode: None if its functions loaded, else why not (the service's own error)."""
    reply = await bench.nc.request("eventfn.api.functions", b"", timeout=10)
    infos = {info["name"]: info for info in msgspec.json.decode(reply.data)}
    out: dict[str, str | None] = {}
    for isolation in (PROCESS, INPROCESS):
        names = [v.name for v in DRAIN + LATENCY + SYNC if v.isolation == isolation]
        broken = [infos[n] for n in names if n not in infos or infos[n]["state"] != "Active"]
        out[isolation] = None if not broken else str(broken[0].get("last_error") or broken[0]["state"])
    return out


async def warm(bench: Bench, function: str, count: int = 10) -> None:
    """Bring up `count` warm workers (the function's default concurrency) before the clock starts."""
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


async def drain(bench: Bench, available: dict[str, str | None]) -> None:
    """Scenario 1: N small JSON events preloaded; time until every one is acknowledged."""
    nc, n = bench.nc, bench.sizes.drain
    took = await stream.preload(nc, DRAIN_SUBJECT, n)
    last = await stream.last_sequence(nc, DRAIN_SUBJECT)
    bench.say(f"1. drain: {n:,} events preloaded in {took:.1f} s")

    async def rate(consumer: str, kick: str) -> float:
        return n / await stream.timed_drain(nc, consumer, kick=kick, last_seq=last, timeout=n / 300 + 60)

    async def in_child(name: str, module: str, *args: str) -> float:
        await stream.create_consumer(nc, name, DRAIN_SUBJECT)
        value, _ = await with_child(bench.child(module, *args), lambda: rate(name, stream.kick_subject(name)))
        return value

    async def ceiling_once(i: int) -> float:
        return await in_child(f"ceiling-{i}", "ceiling", "drain", "--consumer", f"ceiling-{i}")

    async def faststream(batched: bool) -> float:
        name = f"faststream-{'batch' if batched else 'each'}"
        mode = ["--batched"] if batched else []
        return await in_child(name, "peer", "--subject", DRAIN_SUBJECT, "--durable", name, "--batch", "100", *mode)

    # The ceiling runs first, in the middle and last: the machine's speed drifts, the median holds.
    ceilings = [await ceiling_once(0)]
    peer_each = await faststream(batched=False)
    peer_batch = await faststream(batched=True)
    ceilings.append(await ceiling_once(1))
    ours: dict[Variant, float | None] = {}
    for v in DRAIN:
        ours[v] = None
        if available[v.isolation] is None:
            await warm(bench, v.name)
            ours[v] = await rate(v.consumer, v.kick)
            bench.say(f"1. drain: {v.label}: {ours[v]:,.0f} events/s")
    ceilings.append(await ceiling_once(2))
    ceiling = median(ceilings)
    bench.raw["drain"] = {
        "events": n,
        "ceiling_runs": ceilings,
        "faststream": {"per message": peer_each, "batch 100": peer_batch},
        "eventfn": {v.label: r for v, r in ours.items()},
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
                Target(text="≥ 5x FastStream per message", rule="ratio_at_least", bound=5.0),
            )
        else:
            peer, what, target = (
                peer_batch,
                "FastStream batch 100",
                Target(text="ahead of FastStream batched", rule="ratio_at_least", bound=1.0),
            )
        note = "" if r is not None else unavailable(available[v.isolation])
        bench.row("1 drain vs peer", v.label, r, "events/s", ceiling=peer, ceiling_what=what, target=target, note=note)


# -- 2. end-to-end latency -----------------------------------------------------------------------------------


async def _publish(bench: Bench, subject: str) -> dict[str, Any]:
    """Publish at the run's rate for its duration, from a process of its own."""
    s = bench.sizes
    args = ["publish", "--subject", subject, "--rate", str(s.rate), "--seconds", str(s.latency_seconds)]
    return await child_result(bench.child("load", *args), timeout=s.latency_seconds + 60)


async def _ceiling_latency(bench: Bench) -> dict[str, Any]:
    subject, name = "events.bench.lat.ceiling", "ceiling-latency"
    await stream.create_consumer(bench.nc, name, subject, paused=False)

    async def publish_and_settle() -> dict[str, Any]:
        published = await _publish(bench, subject)
        last = await stream.last_sequence(bench.nc, subject)
        await wait_until(functools.partial(stream.acked_up_to, bench.nc, name, last), timeout=60)
        return published

    published, result = await with_child(bench.child("ceiling", "latency", "--consumer", name), publish_and_settle)
    span = max(result["last"] - result["first"], published["seconds"])
    return {"latencies": result["latencies"], "sent": published["sent"], "rate": len(result["latencies"]) / span}


async def _eventfn_latency(bench: Bench, handlers: Path, v: Variant) -> dict[str, Any]:
    reports = reports_dir(handlers, v)
    await warm(bench, v.name)
    published = await _publish(bench, f"events.bench.lat.{v.name}")
    pairs: list[tuple[float, float]] = []

    async def all_in() -> bool:
        pairs[:] = functions.read_reports(reports)
        return len(pairs) >= published["sent"]

    try:
        await wait_until(all_in, timeout=30, interval=0.1)
    except TimeoutError:
        bench.say(f"2. latency: {v.label}: {len(pairs)} of {published['sent']} events reported in time")
    latencies = [received - ts for ts, received in pairs]
    first = min((ts for ts, _ in pairs), default=0.0)
    last = max((received for _, received in pairs), default=0.0)
    span = max(last - first, published["seconds"])
    return {"latencies": latencies, "sent": published["sent"], "rate": len(latencies) / span}


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


# -- 3. sync invoke --------------------------------------------------------------------------------------------


async def _requests(bench: Bench, subject: str) -> dict[str, Any]:
    """Round trips from the run's number of concurrent clients, from a process of their own."""
    s = bench.sizes
    args = ["request", "--subject", subject, "--clients", str(s.clients), "--seconds", str(s.sync_seconds)]
    result = await child_result(bench.child("load", *args, "--warmup", "1.0"), timeout=s.sync_seconds + 60)
    result["rate"] = result["count"] / result["seconds"]
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
    ceiling, _ = await with_child(responder, lambda: _requests(bench, ECHO_SUBJECT))
    measured = {v: None if available[v.isolation] else await _requests(bench, f"eventfn.invoke.{v.name}") for v in SYNC}
    bench.raw["sync"] = {"clients": s.clients, "ceiling": ceiling, "eventfn": {v.label: m for v, m in measured.items()}}
    scenario = f"3 sync invoke, {s.clients} clients"
    ceiling_stats = _sync_stats(ceiling)
    for key, (value, unit) in ceiling_stats.items():
        bench.row(scenario, f"raw nats-py request/reply (the ceiling): {key}", value, unit)
        bench.bar(_sync_panel(key), "ceiling: raw nats-py", value, "ceiling")
    for v, m in measured.items():
        label = "eventfn process" if v.isolation == PROCESS else "eventfn in-process"
        if m is None:
            bench.row(scenario, label, None, "req/s", note=unavailable(available[v.isolation]))
            bench.bar(_sync_panel("round trips/s"), label, None, "eventfn")
            continue
        for key, (value, unit) in _sync_stats(m).items():
            note = f"{m['errors']} errors" if m["errors"] and unit == "req/s" else ""
            ceiling_value = ceiling_stats[key][0]
            bench.row(
                scenario, f"{label}: {key}", value, unit, ceiling=ceiling_value, ceiling_what=RAW_REPLY, note=note
            )
            bench.bar(_sync_panel(key), label, value, "eventfn")


def _sync_panel(key: str) -> str:
    return "sync req/s" if key.endswith("/s") else f"sync ms {key}"
