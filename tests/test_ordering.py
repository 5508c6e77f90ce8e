"""Ordered event source mappings end to end (issue 9), against a real `eventfn serve`: per key (`ordering = "key"`)
under load, through failures, retries and dead letters, and across a SIGKILL and restart; per shard
(`ordering = "shard"`) across a SIGKILL and restart; and an unordered mapping as before.

The handler reports the start and the end of each invocation, with the key and sequence number of every event
it holds, through `_probe`; the test's one client also receives the dead-letter records. A probe report is
delivered before the handler returns, and a dead-letter record before its event is acknowledged, so for any
one key the order in which the test receives them is the order in which things happened: the checks read that
order (`check_order`), never clocks. A restarted service is another "life" (the workers tell theirs): all of a
life's reports happened after the previous life's. Events are published as `nats pub` sends them (with
`-H Order-Id:<key>` for a header key): a core publish of JSON `{"key", "seq"}` (plus `fail`: how many attempts
of that event fail).
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from eventfn.testing import Serve, write_handler
from tests.conftest import FAST_RECOVERY, Collector

pytestmark = pytest.mark.e2e

#: The handler of every test here: reports each invocation's start and end, fails the attempts an event asks
#: to fail (counted in a file: a retry may run in another worker process), and works a random while (`WORK`
#: seconds at most) so that invocations interleave.
ORDERED = """
    import base64
    import json
    import os
    import random
    import time
    import uuid

    import _probe

    LIFE = os.environ.get("ORDER_LIFE", "1")


    def items(event):
        # batch_size 1: the event itself; a batch: SQS-shaped records (or Kinesis-shaped ones).
        if "Records" not in event:
            return [event]
        out = []
        for record in event["Records"]:
            if "kinesis" in record:
                body = base64.b64decode(record["kinesis"]["data"])
            elif record.get("bodyEncoding") == "base64":
                body = base64.b64decode(record["body"])
            else:
                body = record["body"]
            out.append(json.loads(body))
        return out


    def attempt(item):
        path = os.path.join(os.environ["ATTEMPTS_DIR"], "%s-%d" % (item["key"], item["seq"]))
        with open(path, "a") as f:
            f.write(".")
        return os.path.getsize(path)


    def report(phase, invocation, held, **more):
        text = json.dumps({"phase": phase, "inv": invocation, "items": held, "life": LIFE, **more})
        _probe.report("probe.order", text)


    def handler(event, context):
        batch = items(event)
        held = [[item["key"], item["seq"]] for item in batch]
        invocation = uuid.uuid4().hex
        report("start", invocation, held)
        failing = [item["seq"] for item in batch if item.get("fail") and attempt(item) <= item["fail"]]
        time.sleep(random.random() * float(os.environ.get("WORK", "0")))
        report("end", invocation, held, ok=not failing)
        if failing:
            raise RuntimeError("planned failure of events %s" % failing)
"""

KEY_BY_HEADER = """
subjects = ["orders.>"]
ordering = "key"
key = "header:Order-Id"
"""

Event = tuple[str, int]  # (key, sequence number within the key)


# -- reports and the order checker -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One report: an invocation's `start` or `end`, or a `dead` letter (a DLQ record of one event)."""

    phase: str
    items: tuple[Event, ...]
    inv: str = ""
    ok: bool = False
    life: str = "1"


@dataclass
class Progress:
    """What `check_order` found, per key."""

    #: The sequence numbers invocations started, in order (an event retried or replayed appears again).
    starts: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    #: The highest sequence number settled: its invocation ended well, or it was dead-lettered.
    settled: dict[str, int] = field(default_factory=dict)
    ok: set[Event] = field(default_factory=set)
    dead: set[Event] = field(default_factory=set)
    attempts: Counter[Event] = field(default_factory=Counter)


def by_key(items: Iterable[Event]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for key, seq in items:
        out[key].append(seq)
    return out


def check_order(entries: Sequence[Entry]) -> Progress:
    """Check the ordering rules over one function's reports (in arrival order); the first break fails the test.

    For every key: one invocation holds its events at a time (within a life: a killed service's invocations end
    with it); an invocation holds consecutive events of the key, in order; it starts at most one past the last
    settled event (a failed event holds its key until it succeeds or is dead-lettered), and at most one past
    where the key's previous invocation ended: a replay from an earlier point (after a crash) is allowed, a
    skip ahead is not.
    """
    progress = Progress()
    lives = list(dict.fromkeys(e.life for e in entries))
    for life in lives:
        running: dict[str, str] = {}
        for entry in (e for e in entries if e.life == life):
            for key, seqs in by_key(entry.items).items():
                where = f"key {key}, events {seqs} (invocation {entry.inv[:8]}, life {life})"
                settled = progress.settled.get(key, -1)
                if entry.phase == "start":
                    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{where}: not consecutive, in order"
                    assert key not in running, f"{where}: started while invocation {running.get(key, '')[:8]} ran"
                    assert seqs[0] <= settled + 1, f"{where}: started before event {settled + 1} was settled"
                    previous = progress.starts[key][-1] if progress.starts[key] else -1
                    assert seqs[0] <= previous + 1, f"{where}: skipped ahead of event {previous + 1}"
                    running[key] = entry.inv
                    progress.starts[key].extend(seqs)
                    progress.attempts.update((key, s) for s in seqs)
                elif entry.phase == "end":
                    assert running.pop(key, None) == entry.inv, f"{where}: ended, but it was not running"
                    if entry.ok:
                        progress.settled[key] = max(settled, seqs[-1])
                        progress.ok.update((key, s) for s in seqs)
                else:
                    progress.settled[key] = max(settled, seqs[-1])
                    progress.dead.update((key, s) for s in seqs)
    return progress


def test_the_checker_catches_each_kind_of_break() -> None:
    """The checker itself, on made-up reports: what it accepts and what it refuses."""

    def start(inv: str, *items: Event, life: str = "1") -> Entry:
        return Entry("start", items, inv, life=life)

    def end(inv: str, *items: Event, ok: bool = True, life: str = "1") -> Entry:
        return Entry("end", items, inv, ok=ok, life=life)

    a0, a1, a2, b0 = ("a", 0), ("a", 1), ("a", 2), ("b", 0)
    fine = [
        start("1", a0, b0),
        end("1", a0, b0),
        start("2", a1),
        end("2", a1, ok=False),
        start("3", a1),
        end("3", a1, ok=False),
        Entry("dead", (a1,)),
        start("4", a2),  # the key goes on once its failing event is dead-lettered
        start("5", a0, life="2"),  # replayed after a restart: allowed
    ]
    progress = check_order(fine)
    assert progress.starts["a"] == [0, 1, 1, 2, 0] and progress.dead == {a1}
    assert progress.ok == {a0, b0} and progress.attempts[a1] == 2
    ran_0_to_2 = [start("1", a0, a1, a2), end("1", a0, a1, a2)]
    for broken, why in [
        ([start("1", a0), start("2", a1)], "started while invocation 1"),
        ([start("1", a0), end("1", a0, ok=False), start("2", a1)], "started before event 0 was settled"),
        ([start("1", a0, a2)], "not consecutive"),
        ([start("1", a1, a0)], "not consecutive"),
        (  # a replay from 0 goes on with 1, even though 1 and 2 ran before the restart
            [*ran_0_to_2, start("2", a0, life="2"), end("2", a0, life="2"), start("3", a2, life="2")],
            "skipped ahead",
        ),
    ]:
        with pytest.raises(AssertionError, match=why):
            check_order(broken)


class Reports:
    """One function's reports and dead-letter records as they arrive, parsed once each."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.entries: list[Entry] = []
        self.ok: set[Event] = set()
        self.dead: set[Event] = set()

    def _parse(self) -> None:
        for msg in self.collector.messages[len(self.entries) :]:
            entry = self._entry(msg)
            self.entries.append(entry)
            if entry.phase == "end" and entry.ok:
                self.ok.update(entry.items)
            elif entry.phase == "dead":
                self.dead.update(entry.items)

    def _entry(self, msg: Msg) -> Entry:
        value: dict[str, Any] = json.loads(msg.data)
        if msg.subject.startswith("eventfn.dlq."):
            payload = value["requestPayload"]
            life = self.entries[-1].life if self.entries else "1"  # written before its event was acknowledged
            return Entry("dead", ((payload["key"], payload["seq"]),), life=life)
        items = tuple((key, seq) for key, seq in value["items"])
        return Entry(value["phase"], items, value["inv"], bool(value.get("ok")), value["life"])

    def count_ok(self) -> int:
        self._parse()
        return len(self.ok)

    async def wait_until(self, done: Callable[[], bool], timeout: float = 60.0) -> None:
        """Wait (on arriving reports, no sleeping) until `done()`; fail after `timeout` seconds."""
        with anyio.fail_after(timeout):
            while True:
                self._parse()
                if done():
                    return
                await self.collector.wait_for(len(self.collector.messages) + 1, timeout=timeout)

    async def settle(
        self, expected: set[Event], dead: frozenset[Event] = frozenset(), timeout: float = 60.0
    ) -> Progress:
        """Wait until every expected event ended well (and `dead` were dead-lettered); then check the order."""
        await self.wait_until(lambda: expected - dead <= self.ok and dead <= self.dead, timeout)
        return check_order(self.entries)


# -- set-up ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def attempts(tmp_path: Path) -> Path:
    """Where the handler counts the attempts of events that ask to fail (workers may run as another user)."""
    path = tmp_path / "attempts"
    path.mkdir()
    path.chmod(0o777)
    return path


def add_ordered(
    handlers: Path,
    name: str,
    attempts: Path,
    trigger: str,
    *,
    concurrency: int = 10,
    timeout: float = 3,
    work: float = 0.0,
    base_delay: float = 0.2,
    max_delay: float = 1.0,
) -> None:
    """A function running `ORDERED` with the trigger table `trigger` (TOML lines) and a retry policy."""
    settings = f"""
timeout = {timeout}
concurrency = {concurrency}

[[triggers]]
{textwrap.dedent(trigger).strip()}

[retry]
max_attempts = 3
base_delay = {base_delay}
max_delay = {max_delay}

[environment]
ATTEMPTS_DIR = "{attempts}"
WORK = "{work}"
"""
    block = "\n".join(f"# {line}" if line else "#" for line in settings.strip().splitlines())
    write_handler(handlers, name, f"# /// eventfn\n{block}\n# ///\n{textwrap.dedent(ORDERED).lstrip()}")


async def start_service(
    serve: Callable[..., Awaitable[Serve]], function: str, life: int = 1, config: str | None = None
) -> Serve:
    """`eventfn serve` (with `config` as its eventfn.toml), its workers told their life; fails at once, with the
    reason, if `function` did not load."""
    service = await serve(
        env={"ORDER_LIFE": str(life), "EVENTFN_WORKER_ENV_PASSTHROUGH": "PROBE_NATS,ORDER_LIFE"}, config=config
    )
    await service.log.await_line(r"eventfn ready")
    if f"function {function} loaded" not in service.log.text():
        problems = [line for line in service.log.lines if f"function {function}" in line]
        pytest.fail("\n".join(problems) or f"function {function} did not load")
    return service


async def subscribe_reports(nc: Client, function: str) -> Reports:
    """The reports and the function's dead-letter records, on one subscription client: arrival order is causal
    per key."""
    collector = Collector()
    await nc.subscribe("probe.order", cb=collector.on_message)
    await nc.subscribe(f"eventfn.dlq.{function}", cb=collector.on_message)
    await nc.flush()
    return Reports(collector)


async def publish_keyed(
    nc: Client, keys: Sequence[str], count: int, marks: dict[Event, dict[str, Any]] | None = None
) -> set[Event]:
    """`count` events per key, interleaved (seq 0 of every key, then seq 1...), as `nats pub -H Order-Id:<key>
    orders.<key> '{"key": ..., "seq": ...}'` sends them (`marks` adds fields to some); returns them."""
    for seq in range(count):
        for key in keys:
            body = {"key": key, "seq": seq, **(marks or {}).get((key, seq), {})}
            await nc.publish(f"orders.{key}", json.dumps(body).encode(), headers={"Order-Id": key})
    await nc.flush()
    return {(key, seq) for key in keys for seq in range(count)}


# -- per key -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 5])
async def test_each_key_runs_in_publish_order_one_invocation_at_a_time_under_load(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, attempts: Path, batch_size: int
) -> None:
    add_ordered(handlers, "orders", attempts, KEY_BY_HEADER + f"batch_size = {batch_size}\n", work=0.004)
    await start_service(serve, "orders")
    reports = await subscribe_reports(nc, "orders")
    keys = [f"k{n:02}" for n in range(20)]
    expected = await publish_keyed(nc, keys, 50)
    progress = await reports.settle(expected)
    for key in keys:
        assert progress.starts[key] == list(range(50)), f"key {key}: started in this order"
    assert progress.ok == expected and not progress.dead
    if batch_size > 1:
        assert max(len(e.items) for e in reports.entries) > 1, "batches were formed"


async def test_a_failing_event_holds_its_key_while_other_keys_go_on_and_a_dead_letter_releases_it(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, attempts: Path
) -> None:
    """k0's event 2 fails twice, then succeeds; k1's event 3 always fails and is dead-lettered after its last
    attempt (the first and 3 retries). Each holds its key meanwhile, and only its key: with retries 1 to 2 s
    apart, every other key is done before k0's event 2 succeeds."""
    add_ordered(handlers, "orders", attempts, KEY_BY_HEADER + "batch_size = 1\n", base_delay=2.0, max_delay=2.0)
    await start_service(serve, "orders")
    reports = await subscribe_reports(nc, "orders")
    keys = [f"k{n}" for n in range(10)]
    expected = await publish_keyed(nc, keys, 10, marks={("k0", 2): {"fail": 2}, ("k1", 3): {"fail": 99}})
    progress = await reports.settle(expected, dead=frozenset({("k1", 3)}))

    assert progress.starts["k0"] == [0, 1, 2, 2, 2, *range(3, 10)]
    assert progress.starts["k1"] == [0, 1, 2, 3, 3, 3, 3, *range(4, 10)]
    assert progress.dead == {("k1", 3)} and progress.ok == expected - {("k1", 3)}
    for key in keys[2:]:
        assert progress.starts[key] == list(range(10)), f"key {key}: started in this order"
    entries = reports.entries
    k0_retried = next(i for i, e in enumerate(entries) if e.phase == "end" and e.ok and ("k0", 2) in e.items)
    others_done = max(
        i for i, e in enumerate(entries) if e.phase == "end" and any(k not in ("k0", "k1") for k, _ in e.items)
    )
    assert others_done < k0_retried, "another key waited for k0's retries"
    [record] = [json.loads(m.data) for m in reports.collector.messages if m.subject == "eventfn.dlq.orders"]
    assert record["requestPayload"] == {"key": "k1", "seq": 3, "fail": 99}
    assert record["requestContext"]["condition"] == "RetriesExhausted"
    assert progress.attempts[("k1", 3)] == 4, "the first attempt and max_attempts = 3 retries"


async def test_a_sigkill_mid_stream_loses_nothing_and_never_runs_a_key_ahead(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, attempts: Path
) -> None:
    """Killed with keys in flight and restarted, the service replays what was not acknowledged: an event may run
    again (at least once), but no key's event starts before the one before it was settled."""
    add_ordered(handlers, "orders", attempts, KEY_BY_HEADER + "batch_size = 1\n", timeout=1, work=0.02)
    first = await start_service(serve, "orders", life=1, config=FAST_RECOVERY)
    reports = await subscribe_reports(nc, "orders")
    keys = [f"k{n}" for n in range(10)]
    expected = await publish_keyed(nc, keys, 30)
    await reports.wait_until(lambda: reports.count_ok() >= 80)
    first.kill()
    assert reports.count_ok() < len(expected), "the kill must come mid-stream"
    await start_service(serve, "orders", life=2, config=FAST_RECOVERY)
    progress = await reports.settle(expected)
    assert progress.ok == expected
    for key in keys:
        assert set(progress.starts[key]) == set(range(30))


# -- per shard ---------------------------------------------------------------------------------------------------------


async def test_each_batch_holds_one_shard_in_order_across_a_sigkill(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, attempts: Path
) -> None:
    """`key = "subject:1"`: the second token of `clicks.<shard>.x` names the shard. Every batch holds events of one
    shard, consecutive and in order; one batch per shard runs at a time; after a SIGKILL the shard resumes from
    its checkpoint (replaying at most what was not checkpointed) and no event is lost."""
    trigger = """
        subjects = ["clicks.>"]
        ordering = "shard"
        key = "subject:1"
        batch_size = 10
        batch_window = 0.05
    """
    add_ordered(handlers, "clicks", attempts, trigger, timeout=1, work=0.1)
    first = await start_service(serve, "clicks", life=1, config=FAST_RECOVERY)
    reports = await subscribe_reports(nc, "clicks")
    shards = [f"s{n}" for n in range(4)]
    for seq in range(60):
        for shard in shards:  # what `nats pub clicks.<shard>.x '{...}'` sends: no headers
            await nc.publish(f"clicks.{shard}.x", json.dumps({"key": shard, "seq": seq}).encode())
    await nc.flush()
    expected = {(shard, seq) for shard in shards for seq in range(60)}
    await reports.wait_until(lambda: reports.count_ok() >= 40)
    first.kill()
    assert reports.count_ok() < len(expected), "the kill must come mid-stream"
    await start_service(serve, "clicks", life=2, config=FAST_RECOVERY)
    progress = await reports.settle(expected)
    assert progress.ok == expected
    for entry in reports.entries:
        if entry.phase == "start":
            assert len(by_key(entry.items)) == 1, f"a batch of several shards: {entry.items}"
    assert max(len(e.items) for e in reports.entries) > 1, "batches were formed"


# -- unordered ---------------------------------------------------------------------------------------------------------


async def test_an_unordered_mapping_batches_every_key_together_as_before(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, attempts: Path
) -> None:
    trigger = """
        subjects = ["orders.>"]
        ordering = "none"
        batch_size = 20
        batch_window = 1
    """
    add_ordered(handlers, "orders", attempts, trigger)
    await start_service(serve, "orders")
    reports = await subscribe_reports(nc, "orders")
    keys = ["a", "b", "c", "d"]
    expected = await publish_keyed(nc, keys, 5)
    progress = await reports.settle(expected)
    [batch] = [e for e in reports.entries if e.phase == "start"]
    assert batch.items == tuple((key, seq) for seq in range(5) for key in keys), "one batch, in publish order"
    assert progress.ok == expected
