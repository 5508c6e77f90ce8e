"""Stalls are logged once when they start, once per interval while they last, and once when they clear: the
reporter on a fake clock, then the pull feed, stored publishes and stream checks against a real nats-server."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import anyio
import nats.js.errors
import pytest

from eventfn.broker.connection import connect
from eventfn.broker.stalls import Stalls
from eventfn.config import NatsSettings
from eventfn.testing import NatsServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LogLines(logging.Handler):
    """eventfn's log records as text, with a way to wait (without sleeping) for one to match."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._changed = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self._changed.set()

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))

    async def wait_for(self, pattern: str, timeout: float = 15.0) -> str:
        with anyio.fail_after(timeout):
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                self._changed = anyio.Event()
                await self._changed.wait()


@pytest.fixture
def lines() -> Iterator[LogLines]:
    handler = LogLines()
    logger = logging.getLogger("eventfn")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.setLevel(level)
    logger.removeHandler(handler)


# -- the reporter ------------------------------------------------------------------------------------------------------


def test_a_stall_is_logged_when_it_starts_once_per_interval_and_when_it_clears(lines: LogLines) -> None:
    clock = Clock()
    stalls = Stalls(interval=10.0, clock=clock)
    for _ in range(250):  # 25 s of failures, ten a second
        stalls.failed("consumer EVENTFN/a--t0", "no responders")
        clock.now += 0.1
    assert lines.count(r"^JetStream stall: consumer EVENTFN/a--t0: no responders$") == 1
    assert (
        lines.count(r"^JetStream still stalled after 1\d s: consumer EVENTFN/a--t0: no responders \(\d+ times\)") == 1
    )
    assert lines.count(r"^JetStream still stalled after 2\d s") == 1
    assert len(lines.lines) == 3
    stalls.recovered("consumer EVENTFN/a--t0")
    assert lines.lines[-1] == "JetStream recovered after 25.0 s (consumer EVENTFN/a--t0)"
    assert not stalls.stalled


def test_a_stall_ends_when_everything_that_stalled_works_again(lines: LogLines) -> None:
    clock = Clock()
    stalls = Stalls(interval=10.0, clock=clock)
    stalls.failed("stream EVENTFN", "no leader")
    clock.now += 1
    stalls.failed("consumer EVENTFN/a--t0", "no responders")  # joins the stall: no line of its own yet
    assert len(lines.lines) == 1
    stalls.recovered("stream EVENTFN")
    assert stalls.stalled and len(lines.lines) == 1
    clock.now += 10
    stalls.failed("consumer EVENTFN/a--t0", "no responders")
    assert lines.lines[-1] == "JetStream still stalled after 11 s: consumer EVENTFN/a--t0: no responders (2 times)"
    stalls.recovered("consumer EVENTFN/a--t0")
    assert lines.lines[-1] == "JetStream recovered after 11.0 s (stream EVENTFN, consumer EVENTFN/a--t0)"


def test_successes_outside_a_stall_log_nothing(lines: LogLines) -> None:
    stalls = Stalls()
    for _ in range(1000):
        stalls.recovered("stream EVENTFN")
    stalls.failed("consumer S/c", "no responders")
    stalls.forget("consumer S/c")  # its feed stopped: the stall ends without a recovery to report
    stalls.recovered("consumer S/c")
    assert lines.lines == ["JetStream stall: consumer S/c: no responders"]
    assert not stalls.stalled


# -- against a real nats-server -----------------------------------------------------------------------------------


async def test_a_pull_feed_without_a_consumer_leader_logs_one_stall_and_recovers(
    nats_server: NatsServer, lines: LogLines
) -> None:
    """A consumer nobody serves (as during an election) answers pull requests with 503: the feed backs off,
    the log says so once, and the feed resumes on its own once the consumer is served again."""
    async with connect([nats_server.url], NatsSettings()) as bus:
        await bus.ensure_stream("S", ["s.>"], max_age=60)
        feed = bus.pull_feed("S", "c", max_inflight=4)
        async with anyio.create_task_group() as tg:
            await tg.start(feed.run)
            await lines.wait_for(r"^JetStream stall: consumer S/c: no responders")
            with anyio.fail_after(15):
                while bus.stalls.failures("consumer S/c") < 3:  # noqa: ASYNC110
                    await anyio.sleep(0.05)  # polling a count: nothing signals "the feed asked again"
            await bus.ensure_consumer("S", "c", filter_subjects=["s.>"], ack_wait=30, max_ack_pending=4)
            await bus.publish_stored("s.x", b"hello")
            with anyio.fail_after(15):
                delivery = await feed.receive()
            assert delivery.data == b"hello"
            await delivery.ack()
            await lines.wait_for(r"^JetStream recovered after [\d.]+ s \(consumer S/c\)$")
            feed.stop()
    assert lines.count(r"^JetStream stall") == 1
    assert lines.count(r"pull request") == 0, "no line per pull request"


async def test_failing_stored_publishes_are_one_stall(nats_server: NatsServer, lines: LogLines) -> None:
    async with connect([nats_server.url], NatsSettings()) as bus:
        for _ in range(20):
            with pytest.raises(nats.js.errors.NoStreamResponseError):
                await bus.publish_stored("nowhere.x", b"{}", timeout=1)
        await bus.ensure_stream("NOWHERE", ["nowhere.>"], max_age=60)
        await bus.publish_stored("nowhere.x", b"{}")
    assert lines.count(r"^JetStream stall: stored publish to nowhere.x: no stream answered") == 1
    assert lines.count(r"^JetStream recovered after [\d.]+ s \(stored publish to nowhere.x\)$") == 1
    assert len([line for line in lines.lines if "JetStream" in line]) == 2


async def test_a_missing_stream_is_a_stall_and_a_present_one_reports_its_state(
    nats_server: NatsServer, lines: LogLines
) -> None:
    async with connect([nats_server.url], NatsSettings()) as bus:
        assert await bus.check_stream("GONE") is None
        assert lines.lines == ["JetStream stall: stream GONE: the stream does not exist"]
        await bus.ensure_stream("HERE", ["here.>"], max_age=60, max_bytes=1 << 20)
        health = await bus.check_stream("HERE")
        assert health is not None
        assert (health.subjects, health.replicas, health.max_age, health.max_bytes, health.lagging) == (
            ["here.>"],
            1,
            60.0,
            1 << 20,
            [],
        )
        assert health.leader  # a single server leads its own streams
