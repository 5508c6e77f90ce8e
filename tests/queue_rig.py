"""A queue mapping run by a real dispatcher on a real pull feed, against a real nats-server: the queue's streams
(its own and its DLQ's) made as the service makes them, the mapping planned from a trigger as the service plans
it, and the function a Python callable that records what it was given."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec

from eventfn.broker.bus import Bus
from eventfn.broker.feeds import Delivery
from eventfn.broker.state import StateStore
from eventfn.config import FunctionSettings, QueueSettings, ServiceConfig
from eventfn.invoke.invocation import Invocation, LambdaError, Outcome
from eventfn.sources import mappings, queues
from eventfn.sources.dispatch import Dispatcher
from eventfn.sources.mappings import Mapping
from eventfn.sources.resources import Resources

OK = Outcome(ok=True, payload=b"null")
BOOM = Outcome(
    ok=False, payload=b'{"errorType":"Boom","errorMessage":"no"}', error=LambdaError(type="Boom", message="no")
)


def item_failures(*ids: str) -> Outcome:
    body = {"batchItemFailures": [{"itemIdentifier": i} for i in ids]}
    return Outcome(ok=True, payload=json.dumps(body).encode())


class Received(msgspec.Struct):
    """One record as the function got it, and when."""

    at: float
    record: dict[str, Any]

    @property
    def body(self) -> str:
        return str(self.record["body"])

    @property
    def count(self) -> int:
        return int(self.record["attributes"]["ApproximateReceiveCount"])


class Function:
    """Records every invocation's records; `answer(records)` says how it ends (default: success)."""

    def __init__(self, answer: Callable[[list[dict[str, Any]]], Outcome | Awaitable[Outcome]] | None = None) -> None:
        self.answer = answer
        self.calls: list[list[Received]] = []
        self.events: list[dict[str, Any]] = []
        self._changed = anyio.Event()

    @property
    def received(self) -> list[Received]:
        return [r for call in self.calls for r in call]

    def bodies(self) -> list[str]:
        return [r.body for r in self.received]

    async def __call__(self, invocation: Invocation) -> Outcome:
        event = json.loads(invocation.payload)
        self.events.append(event)
        now = time.time()
        self.calls.append([Received(at=now, record=r) for r in event["Records"]])
        self._changed.set()
        self._changed = anyio.Event()
        if self.answer is None:
            return OK
        outcome = self.answer(event["Records"])
        return await outcome if isinstance(outcome, Awaitable) else outcome

    async def wait(self, until: Callable[[], bool], timeout: float = 15.0) -> None:
        """Wait (no polling) until `until()` holds after some invocation."""
        with anyio.fail_after(timeout):
            while not until():
                await self._changed.wait()


def config(**declared: QueueSettings) -> ServiceConfig:
    return ServiceConfig(queues=declared)


async def make_queues(bus: Bus, service: ServiceConfig) -> Resources:
    """The streams of every queue `service` declares, DLQs included, as the service provisions them."""
    resources = Resources.of(service)
    for spec in resources.specs():
        await bus.ensure(spec)
    return resources


def plan(resources: Resources, queue: str, *, timeout: float = 1.0, **trigger: Any) -> Mapping:
    settings = FunctionSettings(timeout=timeout, triggers=[{"type": "queue", "queue": queue, **trigger}])
    return mappings.plan("fn", settings, resources=resources)["fn--t0"]


@asynccontextmanager
async def running(bus: Bus, mapping: Mapping, function: Function) -> AsyncIterator[Dispatcher]:
    """The mapping's consumer provisioned and its dispatcher running; stopped (in-flight batches settled) on exit."""
    await mappings.provision(bus, mapping)
    stream = mapping.source.stream
    made: list[Dispatcher] = []

    async def handed_back(deliveries: list[Delivery]) -> None:  # as the service wires it
        await made[0].note_hand_back(list(deliveries))

    feed = bus.pull_feed(
        stream,
        mapping.name,
        max_inflight=mapping.max_inflight,
        options=mapping.source.consumer,
        on_hand_back=handed_back,
    )

    async def recovery() -> tuple[int, int]:
        state = await bus.consumer_state(stream, mapping.name)
        return (state.ack_pending, state.delivered_stream_seq) if state else (0, 0)

    state = StateStore(bus).of("queues")  # the service's: hand-backs noted in JetStream KV
    dispatcher = Dispatcher(bus, mapping, feed, invoke=function, recovery=recovery, state=state)
    made.append(dispatcher)
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run)
        try:
            yield dispatcher
        finally:
            dispatcher.stop()


async def stored(bus: Bus, queue: str) -> list[tuple[bytes, dict[str, str]]]:
    """The messages queue `queue` holds (bodies and headers), oldest first."""
    found = await bus.read(f"EVENTFN_Q_{queue}", queues.subject(queue))
    return [(r.data, r.headers or {}) for r in found]


async def drained(bus: Bus, queue: str, timeout: float = 10.0) -> None:
    """Wait until queue `queue` holds no message. Polls: acknowledgements are the server's, and nothing announces
    that the last was applied."""
    with anyio.fail_after(timeout):
        while await stored(bus, queue):  # noqa: ASYNC110
            await anyio.sleep(0.05)
