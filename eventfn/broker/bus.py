"""The only module that speaks NATS: connection, provisioning, publishing, requests and pull feeds.

nats-py is asyncio-only and large; everything else in eventfn sees the small types defined here
(`Delivery`, `Request`, `PullFeed`) and stays plain anyio.

The pull feed is hand-pipelined, as measured in ../shared/reference/nats-performance.md: a raw subscription on
an inbox with pull requests kept outstanding, a new request sent as soon as half the credit is used, so the
consumer never waits for a round trip between batches (the stock `fetch()` loop costs 4x the ceiling).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.streams.memory import MemoryObjectReceiveStream
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import PubAck

from eventfn import events
from eventfn.broker.auth import INBOX_PREFIXES, SERVICE, redact
from eventfn.broker.stalls import Stalls
from eventfn.config import NatsSettings
from eventfn.errors import ConfigError, NatsUnavailable, PermissionDenied
from eventfn.subjects import covers, stream_subjects

log = logging.getLogger(__name__)

_ACK = b"+ACK"
_WIP = b"+WPI"
_pull_request = msgspec.json.Encoder()


class PullRequest(msgspec.Struct, frozen=True):
    """The body of `$JS.API.CONSUMER.MSG.NEXT`: how many messages, and for how long (ns)."""

    batch: int
    expires: int


class GroupPullRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """A pull request in a consumer's priority group (ADR-42): the group, and the pin JetStream gave this client
    once it has one. With `max_bytes` 1 the request takes no message (every one is larger) but still tells
    JetStream the pinned client is alive."""

    batch: int
    expires: int
    group: str
    id: str | None = None
    max_bytes: int = 0


#: The header with which JetStream names the pin on every message it delivers to the pinned client.
_PIN_HEADER = "Nats-Pin-Id"
#: The pin token of a request sent without a pin (a standby client's), in its reply subject.
_NO_PIN = "_"
#: The batch token of a keep-alive request, in its reply subject.
_KEEP_ALIVE = "k"


class Delivery:
    """One JetStream message handed to the dispatcher, with the ways to settle it."""

    __slots__ = (
        "_feed",
        "_msg",
        "data",
        "delivered",
        "headers",
        "received_at",
        "settled",
        "stream",
        "stream_seq",
        "subject",
        "timestamp_ns",
    )

    def __init__(self, msg: Msg, feed: PullFeed) -> None:
        self._msg = msg
        self._feed = feed
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.headers: dict[str, str] | None = msg.headers
        self.settled = False
        self.received_at = time.time()
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending> (v1), or with domain and
        # account hash before the stream and a random token after (v2).
        tokens = msg.reply.split(".")
        base = 2 if len(tokens) == 9 else 4
        self.stream: str = tokens[base]
        self.delivered = int(tokens[base + 2])
        self.stream_seq = int(tokens[base + 3])
        self.timestamp_ns = int(tokens[base + 5])

    async def ack(self) -> None:
        """The outcome is settled: never deliver this message again."""
        await self._settle(_ACK)

    async def nak(self, delay: float = 0.0) -> None:
        """Deliver the message again after `delay` seconds (JetStream holds it; no worker waits)."""
        body = b"-NAK" if delay <= 0 else b'-NAK {"delay": %d}' % int(delay * 1e9)
        await self._settle(body)

    async def in_progress(self) -> None:
        """Reset the ack timer: the message is still being worked on."""
        if not self.settled:
            await self._feed.nc.publish(self._msg.reply, _WIP)

    async def _settle(self, body: bytes) -> None:
        if self.settled:
            return
        self.settled = True
        try:
            await self._feed.nc.publish(self._msg.reply, body)
        finally:
            self._feed.released()


class PullFeed:
    """A pipelined pull consumer: yields at most `max_inflight` unsettled deliveries at a time.

    With `group` (the consumer is exclusive: `ConsumerOptions.exclusive`) the feed pulls in that priority group,
    and JetStream serves only the client it pinned: the first to ask once no one holds the pin. The others wait
    as standbys, their requests held, until the pinned one has not asked for `pin_timeout` (it stopped, crashed,
    or lost its connection); then one of them is pinned and receives what is left, the dead one's
    unacknowledged messages once their ack wait ends. JetStream names the pin in a `Nats-Pin-Id` header on
    every delivery (the feed removes it); the pinned feed sends it back in each request, and sends a request
    that takes nothing when it has not asked for a third of `pin_timeout` (all its credit in use), so a busy
    process keeps its pin. A request with a pin JetStream no longer holds is refused (status 423): the feed
    then knows it lost the pin and goes on asking as a standby.
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        *,
        max_inflight: int,
        expires: float = 5.0,
        reconnect_hooks: list[Callable[[], None]] | None = None,
        on_lost: Callable[[], None] | None = None,
        stalls: Stalls | None = None,
        group: str | None = None,
        pin_timeout: float = 10.0,
        on_pin_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.nc = nc
        self._hooks = reconnect_hooks if reconnect_hooks is not None else []
        self._on_lost = on_lost
        self._stalls = stalls if stalls is not None else Stalls()
        self._stall_key = f"consumer {stream}/{consumer}"
        self._stalled = False
        # After a request nobody took (503: the consumer has no leader), wait before asking again.
        self._backoff = 0.0
        self._retry_at = 0.0
        self.stream = stream
        self.consumer = consumer
        self.max_inflight = max(1, max_inflight)
        self.expires = expires
        self.outstanding = 0  # requested from the server, not yet received
        self.inflight = 0  # received, not yet settled
        self._stopping = False
        self._wake = anyio.Event()
        self._heard = time.monotonic()
        # A plain asyncio queue: anyio's memory stream yields to the loop on every receive, even with items
        # waiting (5 us a message). The credit bounds it; twice the credit leaves room for a late message
        # from a request presumed lost. None marks the end.
        self._queue: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._closed = False
        #: The consumer's priority group when it is exclusive (None: any number of clients share it).
        self.group = group
        self._pin: str | None = None
        self._on_pin_change = on_pin_change
        # JetStream pins another client when the pinned one has not asked for `pin_timeout`.
        self._keep_pin_every = pin_timeout / 3
        self._asked_pinned = 0.0
        self._inbox = ""

    @property
    def pinned(self) -> bool:
        """Whether JetStream last named this feed the exclusive consumer's pinned client (it gets the messages)."""
        return self._pin is not None

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called: what is still received should be handed back, not started."""
        return self._stopping

    async def receive(self) -> Delivery:
        """The next delivery; raises `anyio.EndOfStream` once the feed has stopped and is drained."""
        delivery = await self._queue.get()
        if delivery is None:
            self._queue.put_nowait(None)  # the end, for every other receiver too
            raise anyio.EndOfStream
        return delivery

    def receive_nowait(self) -> Delivery:
        """The next delivery if one is waiting; raises `anyio.WouldBlock` otherwise, `anyio.EndOfStream` at end."""
        try:
            delivery = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            raise anyio.WouldBlock from None
        if delivery is None:
            self._queue.put_nowait(None)
            raise anyio.EndOfStream
        return delivery

    def released(self) -> None:
        """A delivery was settled: its credit can be requested again."""
        self.inflight -= 1
        if self.max_inflight - self.outstanding - self.inflight >= self._threshold:
            self._wake.set()

    @property
    def _threshold(self) -> int:
        return max(1, self.max_inflight // 2)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep pull requests outstanding until `stop()`; then stop receiving. A feed pinned to an exclusive
        consumer then keeps its pin until every delivery it gave is settled, and unpins."""
        inbox = self._inbox = self.nc.new_inbox()
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}"
        if self.group is None:
            sub = await self.nc.subscribe(inbox, cb=self._on_message, pending_msgs_limit=-1, pending_bytes_limit=-1)
        else:
            # Each request's reply subject names the pin it carried and its batch, `<inbox>.<pin>.<batch>`: a
            # refusal then says which pin JetStream refused and how much credit comes back.
            sub = await self.nc.subscribe(
                inbox + ".*.*", cb=self._on_group_message, pending_msgs_limit=-1, pending_bytes_limit=-1
            )
        self._hooks.append(self._requests_lost)
        task_status.started()
        try:
            while not self._stopping:
                want = self.max_inflight - self.outstanding - self.inflight
                wait = self.expires + 2.0
                if (held := self._retry_at - time.monotonic()) > 0:
                    wait = held
                elif want >= self._threshold or (want > 0 and self.outstanding == 0):
                    if self.group is None:
                        body = _pull_request.encode(PullRequest(batch=want, expires=int(self.expires * 1e9)))
                        await self.nc.publish(subject, body, reply=inbox)
                    else:
                        await self._group_request(subject, want)
                    self.outstanding += want
                    self._heard = time.monotonic()
                if self._pin is not None:
                    wait = min(wait, await self._keep_pin(subject))
                with anyio.move_on_after(wait):
                    await self._wake.wait()
                self._wake = anyio.Event()
                if self.outstanding and time.monotonic() - self._heard > self.expires + 2.0:
                    # Neither messages nor the request's 408 came back: the request was lost (reconnect,
                    # server restart, the consumer's leader lost). Ask again rather than wait forever.
                    self.outstanding = 0
                    self._trouble(f"no answer to a pull request in {self.expires + 2.0:.0f} s")
        finally:
            self._stalls.forget(self._stall_key)
            self._hooks.remove(self._requests_lost)
            with anyio.CancelScope(shield=True):
                try:
                    # Drain, not unsubscribe: the server stops serving our pull requests once it has our
                    # UNSUB (it checks interest), and the flush inside drain brings in whatever it sent
                    # before that. Those arrive through `_on_message` and are handed back with a nak
                    # instead of sitting unacknowledged until their ack wait runs out.
                    await sub.drain()  # type: ignore[no-untyped-call]
                except nats.errors.Error:
                    pass
                self._closed = True
                self._queue.put_nowait(None)
        if self._pin is not None:
            try:
                await self._hand_over(subject)
            except nats.errors.Error as exc:  # the connection closed: the pin lapses after its timeout
                log.warning("consumer %s/%s: not handed over: %s", self.stream, self.consumer, exc)

    async def _hand_over(self, subject: str) -> None:
        """Keep the pin while the deliveries this feed gave are worked on, then hand the consumer to a standby
        at once: no other process starts on the next messages (of keys still in work here) before these are
        settled, and none waits out the pin timeout after that. (Cancelled, the feed leaves the pin to lapse.)"""
        # The drain ended this feed's requests; with none counted, every settle from here on wakes the loop.
        self.outstanding = 0
        while self.inflight > 0 and self._pin is not None:
            due = await self._keep_pin(subject)  # its answer comes to no one: JetStream counts the request itself
            with anyio.move_on_after(due):
                await self._wake.wait()
            self._wake = anyio.Event()
        await self.unpin()

    async def _group_request(self, subject: str, batch: int) -> None:
        pin = self._pin
        if pin is not None:
            self._asked_pinned = time.monotonic()
        assert self.group is not None
        body = GroupPullRequest(batch=batch, expires=int(self.expires * 1e9), group=self.group, id=pin)
        await self.nc.publish(subject, _pull_request.encode(body), reply=f"{self._inbox}.{pin or _NO_PIN}.{batch}")

    async def _keep_pin(self, subject: str) -> float:
        """Ask for nothing when the pinned feed has not asked for a while (all its credit in use), which keeps its
        pin; returns the seconds until it is due again."""
        due = self._asked_pinned + self._keep_pin_every - time.monotonic()
        if due > 0:
            return due
        assert self.group is not None and self._pin is not None
        body = GroupPullRequest(batch=1, expires=_ns(self._keep_pin_every), group=self.group, id=self._pin, max_bytes=1)
        reply = f"{self._inbox}.{self._pin}.{_KEEP_ALIVE}"
        await self.nc.publish(subject, _pull_request.encode(body), reply=reply)
        self._asked_pinned = time.monotonic()
        return self._keep_pin_every

    def _set_pin(self, pin: str | None) -> None:
        self._pin = pin
        where = f"{self.stream}/{self.consumer}"
        if pin is not None:
            self._asked_pinned = time.monotonic()  # JetStream started the pin's timer as it chose this client
            log.info("consumer %s: this process consumes it now (pinned in group %s)", where, self.group)
        else:
            log.warning("consumer %s: another process consumes it now (JetStream refused this one's pin)", where)
        if self._on_pin_change is not None:
            self._on_pin_change(pin is not None)
        self._wake.set()

    async def unpin(self, timeout: float = 5.0) -> bool:
        """Hand the exclusive consumer to a standby now, rather than after the pin timeout; returns whether this
        feed held the pin. A stopped feed does it once every delivery it gave is settled (before that a standby
        would start on the next messages of keys this process still works on)."""
        pin, self._pin = self._pin, None
        if pin is None or self.group is None:
            return False
        api = f"$JS.API.CONSUMER.{{}}.{self.stream}.{self.consumer}"
        try:
            reply = await self.nc.request(api.format("INFO"), b"", timeout=timeout)
            groups = msgspec.json.decode(reply.data).get("priority_groups") or []
            # UNPIN takes whatever pin the group has: leave it be if ours lapsed and another process holds it.
            if not any(g.get("group") == self.group and g.get("pinned_client_id") == pin for g in groups):
                return False
            reply = await self.nc.request(api.format("UNPIN"), _json.encode({"group": self.group}), timeout=timeout)
        except nats.errors.Error as exc:
            log.warning("consumer %s/%s: not unpinned: %s", self.stream, self.consumer, exc)
            return False
        if error := msgspec.json.decode(reply.data).get("error"):
            log.warning("consumer %s/%s: not unpinned: %s", self.stream, self.consumer, error.get("description"))
            return False
        return True

    def _requests_lost(self) -> None:
        # A reconnect drops the server's record of our pull requests: ask again now, not after they expire.
        self.refresh()

    def refresh(self) -> None:
        """Send fresh pull requests now: the server will not serve those it holds (after a reconnect, or
        requests that waited while the consumer was paused)."""
        self.outstanding = 0
        self._wake.set()

    def stop(self) -> None:
        """Stop requesting; deliveries already received stay available to drain."""
        self._stopping = True
        self._wake.set()

    def _trouble(self, reason: str) -> None:
        self._stalled = True
        self._stalls.failed(self._stall_key, reason)

    def _healthy(self) -> None:
        self._stalled = False
        self._backoff = 0.0
        self._stalls.recovered(self._stall_key)

    async def _on_group_message(self, msg: Msg) -> None:
        """`_on_message` for a feed in a priority group: follows the pin, and drops what keep-alives bring."""
        headers = msg.headers
        if headers:
            if "Status" in headers and not msg.reply:
                _, pin, batch = msg.subject.rsplit(".", 2)
                if headers["Status"] == "423":
                    # The request carried a pin JetStream no longer holds: it pinned another client (ours
                    # lapsed, or an operator unpinned it). Ask on as a standby. (A request sent without a pin
                    # and pinned by the server is refused with the pin it was given, which may be an older one:
                    # that refusal proves nothing; the pinned requests and keep-alives that follow tell.)
                    if pin == self._pin:
                        self._set_pin(None)
                    if batch != _KEEP_ALIVE:
                        returned = int(headers.get("Nats-Pending-Messages") or batch)
                        self.outstanding = max(0, self.outstanding - returned)
                    self._heard = time.monotonic()
                    self._wake.set()
                    return
                if batch == _KEEP_ALIVE:
                    return  # it ended (expired, or refused a message too large for it): it asked for nothing
            elif _PIN_HEADER in headers:
                pin = headers.pop(_PIN_HEADER)
                if not headers:
                    msg.headers = None
                if pin != self._pin:
                    self._set_pin(pin)
        await self._on_message(msg)

    async def _on_message(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        headers = msg.headers
        if headers and "Status" in headers and not msg.reply:
            status = headers["Status"]
            if status in ("408", "409"):
                # The request ended (expired, or the server cut it); its unfilled part is reported back.
                pending = int(headers.get("Nats-Pending-Messages", "0") or 0)
                self.outstanding = max(0, self.outstanding - pending) if pending else 0
                if status == "409":
                    self._trouble(f"pull request ended: {headers.get('Description', '')}")
                elif self._stalled:
                    self._healthy()  # an expiry is the consumer's leader answering
                self._wake.set()
            elif status in ("503", "400"):
                # 503: no one serves the consumer's pull requests: it has no leader (an election after a server
                # was lost), or JetStream is down. 400: the consumer refuses them (an exclusive consumer asked
                # without its group: an eventfn older than its ordered mapping). Ask again after a pause that
                # grows to 2 s, not in a tight loop.
                self.outstanding = 0
                self._backoff = min(2.0, max(0.25, self._backoff * 2))
                self._retry_at = time.monotonic() + self._backoff
                if status == "503":
                    self._trouble("no responders: the consumer has no leader (an election is under way?)")
                else:
                    self._trouble(f"pull request refused: {headers.get('Description', '')}")
                self._wake.set()
            if self._on_lost and (status == "503" or headers.get("Description") == "Consumer Deleted"):
                # No consumer answers the request (503), or it was deleted under us: its stream or it may be
                # gone. The owner checks and re-creates them, then refreshes the feeds; until then a request
                # that found nobody waits out its expiry, as any lost request does.
                self._on_lost()
            return
        if self._stalled:
            self._healthy()
        self.outstanding = max(0, self.outstanding - 1)
        self.inflight += 1
        delivery = Delivery(msg, self)
        if self._closed or self._queue.qsize() >= 2 * self.max_inflight:
            await delivery.nak()
        else:
            self._queue.put_nowait(delivery)


#: Reply subjects a request may not name: the server's own APIs (JetStream, system, KV...) and eventfn's
#: subjects. Replies go out with the service's rights (NATS `allow_responses` lets it answer whatever reply
#: subject a request carries), so a caller that named `$JS.API.STREAM.PURGE.EVENTFN_DLQ` as its reply
#: subject would otherwise have the service purge the DLQ for it.
_FORBIDDEN_REPLY = ("$", "eventfn.")


class _RefusedReplies:
    """Logs requests whose reply subject was refused, at most once a minute: any client may send them, and one
    line each would let it fill the log."""

    INTERVAL = 60.0

    def __init__(self) -> None:
        self._logged_at = -self.INTERVAL
        self._since_logged = 0

    def report(self, subject: str, reply: str) -> None:
        self._since_logged += 1
        now = time.monotonic()
        if now - self._logged_at < self.INTERVAL:
            return
        more = f" ({self._since_logged - 1} more since the last such line)" if self._since_logged > 1 else ""
        log.warning("request on %s named reply subject %r: not answered there%s", subject, reply, more)
        self._logged_at, self._since_logged = now, 0


_refused_replies = _RefusedReplies()


class Request:
    """A core NATS request (sync invoke, control API) awaiting its reply."""

    __slots__ = ("_nc", "data", "headers", "reply", "subject")

    def __init__(self, nc: Client, msg: Msg) -> None:
        self._nc = nc
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.headers: dict[str, str] | None = msg.headers
        self.reply: str = msg.reply

    async def respond(self, data: bytes, headers: dict[str, str] | None = None) -> None:
        """Send the reply (a no-op for a plain publish that asked for none, or one whose reply subject is a
        NATS API or eventfn subject: no reply is sent there)."""
        if self.reply:
            if self.reply.startswith(_FORBIDDEN_REPLY):
                _refused_replies.report(self.subject, self.reply)
                return
            await self._nc.publish(self.reply, data, headers=headers)


class StoredRecord(msgspec.Struct, frozen=True):
    """A message read back from a stream."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None


class ConsumerState(msgspec.Struct, frozen=True):
    """What `Bus.consumer_state` reports."""

    paused: bool
    pending: int
    ack_pending: int
    redelivered: int
    #: The stream sequence of the last message delivered (0: none yet).
    delivered_stream_seq: int = 0
    #: Every message up to this stream sequence is acknowledged (0: none yet).
    ack_floor_stream_seq: int = 0


#: The priority group of an exclusive consumer (JetStream allows one group per consumer, of at most 16 characters).
EXCLUSIVE_GROUP = "eventfn"

#: Where a new consumer starts, as JetStream's deliver policy.
_DELIVER_POLICY = {"LATEST": "new", "TRIM_HORIZON": "all", "AT_TIMESTAMP": "by_start_time"}


class ConsumerOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How a source's durable consumer delivers: where a new one starts, how deliveries are acknowledged, how often
    one is delivered, and whether one eventfn process at a time consumes it."""

    #: Where a new consumer starts (Kinesis's names): at events published after it is created, at the first
    #: stored event, or at the first stored at or after `start_time`. Fixed at creation: an existing consumer
    #: goes on from where it is.
    start_position: Literal["LATEST", "TRIM_HORIZON", "AT_TIMESTAMP"] = "LATEST"
    #: Epoch seconds, for AT_TIMESTAMP.
    start_time: float | None = None
    #: "none": JetStream forgets a message once delivered (no retry, no ack traffic). Fixed at creation.
    ack: Literal["explicit", "none"] = "explicit"
    #: How often JetStream delivers one message at most (-1: no limit; eventfn's retry policy decides).
    max_deliveries: int = -1
    #: One process at a time receives the consumer's messages (JetStream's pinned client): what per-key and
    #: per-shard ordering need when several eventfn services share the consumer. Open its feed (`Bus.pull_feed`)
    #: with the same options.
    exclusive: bool = False
    #: With `exclusive`: JetStream hands the consumer to another process once the one it pinned has not asked
    #: for messages this long (seconds; a live feed asks at least three times as often). A crashed process's
    #: consumer waits this long, and its unacknowledged messages their ack wait, before another takes over.
    pin_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.start_position == "AT_TIMESTAMP" and self.start_time is None:
            raise ValueError("start_position AT_TIMESTAMP needs a start_time")
        if self.max_deliveries == 0 or self.max_deliveries < -1:
            raise ValueError(f"max_deliveries must be -1 (no limit) or at least 1, not {self.max_deliveries}")
        if self.exclusive and self.ack == "none":
            raise ValueError("an exclusive consumer needs explicit acks (JetStream's pinned client requires them)")
        if self.pin_timeout <= 0:
            raise ValueError(f"pin_timeout must be positive, not {self.pin_timeout}")

    @property
    def group(self) -> str | None:
        """The priority group the consumer's feed pulls in (None: not exclusive)."""
        return EXCLUSIVE_GROUP if self.exclusive else None

    def start_fields(self, from_start: bool) -> dict[str, Any]:
        """Where a new consumer starts, as JetStream's configuration fields."""
        if from_start:
            return {"deliver_policy": "all"}
        fields: dict[str, Any] = {"deliver_policy": _DELIVER_POLICY[self.start_position]}
        if self.start_position == "AT_TIMESTAMP":
            assert self.start_time is not None  # checked above
            when = datetime.fromtimestamp(self.start_time, UTC).isoformat()
            fields["opt_start_time"] = when.replace("+00:00", "Z")
        return fields

    def priority_fields(self) -> dict[str, Any]:
        """The consumer's priority settings: none, or one group with a pinned client."""
        if not self.exclusive:
            return {}
        return {
            "priority_groups": [EXCLUSIVE_GROUP],
            "priority_policy": "pinned_client",
            "priority_timeout": _ns(self.pin_timeout),
        }


_DEFAULT_OPTIONS = ConsumerOptions()

#: Settings JetStream fixes when it creates a consumer: an update must send them back unchanged.
_FIXED_AT_CREATION = ("deliver_policy", "opt_start_seq", "opt_start_time", "ack_policy")


#: What JetStream API calls that time out stall (`Bus.stalls` key).
_API = "JetStream API"

#: "Paused until" far enough away to mean: until resumed.
_PAUSED_FOREVER = "2200-01-01T00:00:00Z"


class Published(msgspec.Struct, frozen=True):
    """What JetStream answered to a stored publish."""

    #: The message's stream sequence (of the first one, for a duplicate).
    seq: int
    #: JetStream had a message with this id within the stream's duplicate window, and dropped this one.
    duplicate: bool


class Reply(msgspec.Struct, frozen=True):
    """A reply received by `Bus.request`."""

    data: bytes
    headers: dict[str, str] | None


class Denials:
    """The permission violations the server reported on one connection (it reports them asynchronously)."""

    def __init__(self) -> None:
        self.count = 0
        self.last = ""
        self.at = -1e9  # time.monotonic() of the last one
        self._changed = asyncio.Event()

    def add(self, text: str) -> None:
        """Record one violation (called from the client's error callback)."""
        self.count += 1
        self.last = text
        self.at = time.monotonic()
        self._changed.set()
        self._changed = asyncio.Event()

    async def next(self) -> None:
        """Return when the next violation is reported."""
        await self._changed.wait()


class Bus:
    """A connected NATS client with eventfn's operations on it."""

    def __init__(
        self,
        nc: Client,
        url: str,
        reconnect_hooks: list[Callable[[], None]] | None = None,
        denials: Denials | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.url = url
        self._reconnect_hooks = reconnect_hooks if reconnect_hooks is not None else []
        self.denials = denials if denials is not None else Denials()
        #: Called when a stream or consumer turns out to be missing (a pull found no consumer, a stored publish
        #: found no stream): the service checks and re-creates what was deleted under it.
        self.on_lost: Callable[[], None] | None = None
        #: Where every stall this connection notices is reported (rate-limited in the log).
        self.stalls = Stalls()
        self._lagging: dict[str, frozenset[str]] = {}
        self._leaders: dict[str, str] = {}

    def _lost(self) -> None:
        if self.on_lost is not None:
            self.on_lost()

    @property
    def max_payload(self) -> int:
        """The largest message the connected server accepts."""
        return int(self.nc.max_payload)

    # -- publishing ---------------------------------------------------------------------------------------

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        """A core publish (fire and forget)."""
        await self.nc.publish(subject, data, headers=headers)

    async def publish_stored(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None, timeout: float = 5.0
    ) -> int:
        """Publish into JetStream and wait until the write is durable; returns the stream sequence."""
        return (await self._publish_stored(subject, data, headers, timeout)).seq

    async def publish_event(
        self, subject: str, event: events.Event, *, stored: bool = True, timeout: float = 5.0
    ) -> Published | None:
        """Publish `event` on `subject` in binary CloudEvents mode (attributes in headers, data as the body).

        Stored (the default), wait until JetStream has it durably. The event's id is the message id
        (`Nats-Msg-Id`), so a second publish of one id within the stream's duplicate window is dropped: a source
        that chooses its ids (`events.new_event(id=...)`) may publish again after a crash without a duplicate.
        Not stored: a core publish, fire and forget (None).
        """
        headers = events.binary_headers(event)  # with Nats-Msg-Id: the event's id
        if not stored:
            await self.nc.publish(subject, event.data, headers=headers)
            return None
        ack = await self._publish_stored(subject, event.data, headers, timeout)
        return Published(seq=ack.seq, duplicate=bool(ack.duplicate))

    async def _publish_stored(
        self, subject: str, data: bytes, headers: dict[str, str] | None, timeout: float
    ) -> PubAck:
        try:
            ack = await self.js.publish(subject, data, headers=headers, timeout=timeout)
        except nats.errors.TimeoutError:
            self.stalls.failed(f"stored publish to {subject}", f"no acknowledgement within {timeout:.0f} s")
            raise
        except nats.js.errors.NoStreamResponseError:
            self.stalls.failed(f"stored publish to {subject}", "no stream answered: no leader, or none stores it")
            self._lost()  # no stream stores the subject: it may have been deleted
            raise
        if self.stalls.stalled:
            self.stalls.recovered(f"stored publish to {subject}")
        return ack

    async def request(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None, timeout: float = 10.0
    ) -> Reply:
        """A core request; raises `TimeoutError` when nothing answers in time, `LookupError` for no responders,
        and `PermissionDenied` at once when the server refuses the request or its reply subscription."""
        # The server refuses with an error of its own, and the request would only time out: wait for either.
        ask = asyncio.ensure_future(self.nc.request(subject, data, headers=headers, timeout=timeout))
        refused = asyncio.ensure_future(self.denials.next())
        try:
            await asyncio.wait((ask, refused), return_when=asyncio.FIRST_COMPLETED)
        finally:
            refused.cancel()
            if not ask.done():
                ask.cancel()
        if not ask.done():  # cancelled above: the server refused
            raise PermissionDenied(self.url, self.denials.last)
        try:
            msg = ask.result()
        except nats.errors.NoRespondersError:
            raise LookupError(subject) from None
        except nats.errors.TimeoutError:
            raise TimeoutError(subject) from None
        return Reply(data=msg.data, headers=msg.headers)

    # -- serving requests -------------------------------------------------------------------------------

    @asynccontextmanager
    async def requests(
        self, subject: str, queue: str, *, limit: int = 1024
    ) -> AsyncIterator[MemoryObjectReceiveStream[Request]]:
        """Subscribe to `subject` in queue group `queue`; yields a bounded stream of incoming requests."""
        send, receive = anyio.create_memory_object_stream[Request](limit)
        nc = self.nc

        async def on_message(msg: Msg) -> None:
            await send.send(Request(nc, msg))

        sub = await nc.subscribe(subject, queue=queue, cb=on_message)
        try:
            yield receive
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await sub.unsubscribe()
                except nats.errors.Error:
                    pass
                send.close()

    # -- JetStream provisioning -------------------------------------------------------------------------

    async def ensure_stream(
        self,
        name: str,
        subjects: Sequence[str],
        *,
        max_age: float,
        max_bytes: int = -1,
        duplicate_window: float = 120.0,
        replicas: int = 1,
    ) -> dict[str, str]:
        """Create the stream, or widen it to hold what is asked; never narrow it.

        Other eventfn services and operators share the stream, so provisioning only adds: `subjects` join those
        the stream has, replicas, `max_age` and `max_bytes` only go up (services asking for different values
        settle on the larger instead of undoing each other at every reload), and every other setting is left
        as it is. Returns the subjects that cannot be added, with the reason (each partly overlaps one the
        stream stores, which JetStream refuses).
        """
        return await self.ensure(
            StreamSpec(
                name=name,
                subjects=list(subjects),
                max_age=max_age,
                max_bytes=max_bytes,
                duplicate_window=duplicate_window,
                replicas=replicas,
            )
        )

    async def ensure(self, spec: StreamSpec) -> dict[str, str]:
        """`ensure_stream` for a stream described by `spec`."""
        name = spec.name
        for _ in range(3):
            current = await self._stream_info(name)
            if current is None:
                try:
                    await self._js_call(
                        self._api(f"STREAM.CREATE.{name}", spec.new_config()), f"create stream {name}", spec
                    )
                except _Raced:
                    continue  # another service created it first: widen theirs
                return {}
            config, refused, kept = _widened(current["config"], spec)
            if kept:
                log.info("stream %s keeps %s: provisioning never narrows a stream", name, "; ".join(kept))
            if config != current["config"]:
                await self._js_call(self._api(f"STREAM.UPDATE.{name}", config), f"update stream {name}", spec)
            return refused
        raise ConfigError("JetStream", f"cannot create stream {name}: it keeps being created and deleted meanwhile")

    async def check_stream(self, name: str, *, timeout: float = 5.0) -> StreamHealth | None:
        """The stream's state, or None when it cannot be had; stalls (no answer, no leader, no stream) go to
        `stalls`, and replicas falling behind or coming back are logged when that changes."""
        what = f"stream {name}"
        asked = time.monotonic()
        try:
            info = await self._stream_info(name, timeout=timeout, stall=None)
        except NatsUnavailable:
            self.stalls.failed(
                what,
                f"no answer within {timeout:.0f} s: it has no leader (an election is under way?) or NATS is down",
                since=asked,
            )
            return None
        if info is None:
            self.stalls.failed(what, "the stream does not exist")
            return None
        cluster = info.get("cluster") or {}
        if not cluster.get("leader"):
            self.stalls.failed(what, "it has no leader (an election is under way?)")
            return None
        self.stalls.recovered(what)
        config = info["config"]
        health = StreamHealth(
            subjects=list(config.get("subjects") or []),
            replicas=int(config.get("num_replicas") or 1),
            max_age=int(config.get("max_age") or 0) / 1e9,
            max_bytes=int(config.get("max_bytes") or -1),
            leader=str(cluster["leader"]),
            lagging=sorted(str(r.get("name")) for r in cluster.get("replicas") or [] if not r.get("current")),
        )
        if health.replicas > 1 and self._leaders.get(name) != health.leader:
            self._leaders[name] = health.leader
            log.info("stream %s: %d replicas, leader %s", name, health.replicas, health.leader)
        lagging = frozenset(health.lagging)
        if lagging != self._lagging.get(name, frozenset()):
            self._lagging[name] = lagging
            if lagging:
                log.warning(
                    "stream %s: replica(s) %s not current (down or catching up); it keeps working while a majority "
                    "of its %d replicas is up",
                    name,
                    ", ".join(health.lagging),
                    health.replicas,
                )
            else:
                log.info("stream %s: all %d replicas current again (leader %s)", name, health.replicas, health.leader)
        return health

    async def _stream_info(self, name: str, *, timeout: float = 5.0, stall: str | None = _API) -> dict[str, Any] | None:
        """The stream's info as the server sent it (every field, also those nats-py does not know), or None."""
        try:
            info: dict[str, Any] = await self._js_call(
                self._api(f"STREAM.INFO.{name}", None, timeout=timeout), f"read stream {name}", stall=stall
            )
        except _NotFound:
            return None
        return info

    async def _api(self, subject: str, body: dict[str, Any] | None, *, timeout: float = 5.0) -> dict[str, Any]:
        """One JetStream API request with a JSON body as is; an error reply raises nats-py's `APIError`.

        Streams are read and updated as plain JSON so that an update sends back every setting the server has,
        also those this nats-py does not know (it would drop them, and the update would reset them).
        """
        payload = b"" if body is None else _json.encode(body)
        msg = await self.nc.request("$JS.API." + subject, payload, timeout=timeout)
        reply: dict[str, Any] = msgspec.json.decode(msg.data)
        if error := reply.get("error"):
            nats.js.errors.APIError.from_error(error)
        return reply

    async def stream_exists(self, name: str) -> bool:
        """Whether the stream exists (other failures, such as no JetStream answering, raise)."""
        try:
            await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def ensure_consumer(
        self,
        stream: str,
        name: str,
        *,
        filter_subjects: Sequence[str],
        ack_wait: float,
        max_ack_pending: int,
        description: str = "",
        metadata: dict[str, str] | None = None,
        options: ConsumerOptions = _DEFAULT_OPTIONS,
        from_start: bool = False,
    ) -> None:
        """Create the durable pull consumer, or update its editable settings (filters, ack wait, limits, max
        deliveries, exclusive or not).

        A new consumer starts where `options.start_position` says, or with `from_start` at the first stored
        message (after its stream was re-created); an existing one resumes where it left off and keeps its ack
        policy (JetStream fixes both at creation). An update leaves a consumer's pause state as it is, and its
        replicas: by default a consumer has as many as its stream (it follows when the stream's change), so its
        acknowledgements survive what the stream survives; a count an operator set stays. Metadata an operator
        added stays too.
        """
        replicas = 0  # as many as the stream
        # Read and written as JetStream's JSON: nats-py's consumer types drop the priority settings.
        try:
            info = await self._js_call(
                self._api(f"CONSUMER.INFO.{stream}.{name}", None), f"read consumer {stream}/{name}"
            )
        except _NotFound:
            fixed = {**options.start_fields(from_start), "ack_policy": options.ack}
        else:
            existing: dict[str, Any] = info["config"]
            fixed = {k: existing[k] for k in _FIXED_AT_CREATION if k in existing}
            if fixed.get("ack_policy", "explicit") != options.ack:
                log.warning(
                    "consumer %s/%s keeps ack policy %s (asked for %s): JetStream fixes it at creation; delete the "
                    "consumer to change it",
                    stream,
                    name,
                    fixed.get("ack_policy"),
                    options.ack,
                )
            replicas = int(existing.get("num_replicas") or 0)
            # The server sets its own `_nats.` keys on every update.
            kept = {k: v for k, v in (existing.get("metadata") or {}).items() if not k.startswith("_nats.")}
            metadata = {**kept, **(metadata or {})} or None
        config: dict[str, Any] = {
            "name": name,
            "durable_name": name,
            **({"description": description} if description else {}),
            **fixed,
            "ack_wait": _ns(ack_wait),
            "max_deliver": options.max_deliveries,
            "replay_policy": "instant",
            "max_waiting": 512,
            "max_ack_pending": max_ack_pending,
            "num_replicas": replicas,
            **({"metadata": metadata} if metadata else {}),
            **_filter_fields(filter_subjects),
            **options.priority_fields(),
        }
        request = {"stream_name": stream, "config": config}
        what = f"provision consumer {stream}/{name}"
        for delay in (0.25, 0.5, 1.0, 2.0, 4.0):  # about 8 s for JetStream to finish what it is busy with
            try:
                await self._js_call(self._api(f"CONSUMER.CREATE.{stream}.{name}", request), what)
                return
            except _Busy:
                await anyio.sleep(delay)
        await self._js_call(self._api(f"CONSUMER.CREATE.{stream}.{name}", request), what)

    async def consumer_exists(self, stream: str, name: str) -> bool:
        """Whether the durable consumer exists."""
        return await self.consumer_metadata(stream, name) is not None

    async def consumer_metadata(self, stream: str, name: str) -> dict[str, str] | None:
        """The consumer's metadata, or None if it does not exist."""
        try:
            info = await self.js.consumer_info(stream, name)
        except nats.js.errors.NotFoundError:
            return None
        return dict(info.config.metadata or {})

    async def consumer_state(self, stream: str, name: str) -> ConsumerState | None:
        """Paused or not, and the backlog (undelivered) and unacknowledged counts; None if it does not exist."""
        try:
            info = await self.js.consumer_info(stream, name)
        except nats.js.errors.NotFoundError:
            return None
        return ConsumerState(
            paused=bool(info.paused),
            pending=info.num_pending or 0,
            ack_pending=info.num_ack_pending or 0,
            redelivered=info.num_redelivered or 0,
            delivered_stream_seq=(info.delivered.stream_seq or 0) if info.delivered else 0,
            ack_floor_stream_seq=(info.ack_floor.stream_seq or 0) if info.ack_floor else 0,
        )

    async def pause_consumer(self, stream: str, name: str) -> None:
        """Pause delivery indefinitely (JetStream consumer pause, nats-server 2.11+)."""
        await self._js_call(self.js.pause_consumer(stream, name, _PAUSED_FOREVER), f"pause consumer {name}")

    async def resume_consumer(self, stream: str, name: str) -> None:
        """Resume a paused consumer (a no-op for one that is not paused)."""
        await self._js_call(self.js.resume_consumer(stream, name), f"resume consumer {name}")

    # -- reading and editing a stream (the DLQ) -------------------------------------------------------------

    async def read(self, stream: str, subject: str, *, start: int = 1, limit: int = 1000) -> list[StoredRecord]:
        """Up to `limit` messages of `stream` on `subject` (wildcards allowed), from sequence `start` on."""
        out: list[StoredRecord] = []
        seq = start
        while len(out) < limit:
            try:
                raw = await self.js.get_msg(stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                break
            assert raw.seq is not None
            out.append(
                StoredRecord(
                    seq=raw.seq,
                    subject=raw.subject or "",
                    data=raw.data or b"",
                    headers=dict(raw.headers) if raw.headers else None,
                )
            )
            seq = raw.seq + 1
        return out

    async def get(self, stream: str, seq: int) -> StoredRecord | None:
        """The message at `seq`, or None if there is none (never was, or deleted)."""
        try:
            raw = await self.js.get_msg(stream, seq=seq)
        except nats.js.errors.NotFoundError:
            return None
        return StoredRecord(
            seq=seq, subject=raw.subject or "", data=raw.data or b"", headers=dict(raw.headers) if raw.headers else None
        )

    async def delete(self, stream: str, seq: int) -> None:
        """Remove one message from a stream."""
        try:
            await self.js.delete_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            pass

    async def purge(self, stream: str, subject: str) -> int:
        """Remove every message on `subject` from `stream`; returns how many there were."""
        before = await self.js.stream_info(stream, subjects_filter=subject)
        count = sum((before.state.subjects or {}).values())
        await self.js.purge_stream(stream, subject=subject)
        return count

    def pull_feed(
        self,
        stream: str,
        consumer: str,
        *,
        max_inflight: int,
        options: ConsumerOptions = _DEFAULT_OPTIONS,
        on_pin_change: Callable[[bool], None] | None = None,
    ) -> PullFeed:
        """A pipelined feed on an existing durable consumer (run it with `PullFeed.run`), provisioned with
        `options`: on an exclusive consumer it pulls in its group, and `on_pin_change` hears whether it is the one
        process that consumes it."""
        return PullFeed(
            self.nc,
            stream,
            consumer,
            max_inflight=max_inflight,
            reconnect_hooks=self._reconnect_hooks,
            on_lost=self._lost,
            stalls=self.stalls,
            group=options.group,
            pin_timeout=options.pin_timeout,
            on_pin_change=on_pin_change,
        )

    def refresh_feeds(self) -> None:
        """Have every running feed send fresh pull requests now (after its consumer was re-created)."""
        for hook in list(self._reconnect_hooks):
            hook()

    async def _js_call(
        self, call: Awaitable[Any], what: str, spec: StreamSpec | None = None, *, stall: str | None = _API
    ) -> Any:
        """Await a JetStream API call; its errors become eventfn's, each saying what to do. A timeout is a stall
        of `stall` (None: the caller reports it)."""
        asked = time.monotonic()
        try:
            result = await call
        except nats.errors.TimeoutError:
            if stall is not None:
                self.stalls.failed(stall, f"no answer to: {what}", since=asked)
            raise NatsUnavailable(
                self.url,
                f"JetStream did not answer in time: {what}",
                "on a cluster, check that a majority of its servers is up; then try again",
            ) from None
        except nats.errors.NoRespondersError:
            raise NatsUnavailable(
                self.url, f"JetStream is not enabled: {what}", "enable JetStream in the server's configuration"
            ) from None
        except nats.js.errors.APIError as exc:
            raise _api_error(exc, what, spec) from exc
        if self.stalls.stalled:
            self.stalls.recovered(_API)
        return result


class StreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What eventfn needs of a stream: these subjects stored, on at least so many servers, kept at least so long."""

    name: str
    subjects: list[str]
    max_age: float
    max_bytes: int = -1
    duplicate_window: float = 120.0
    replicas: int = 1

    def new_config(self) -> dict[str, Any]:
        """The configuration of a new stream (JetStream's JSON; durations in nanoseconds)."""
        return {
            "name": self.name,
            "subjects": self.subjects,
            "retention": "limits",
            "storage": "file",
            "discard": "old",
            "num_replicas": self.replicas,
            "max_age": _ns(self.max_age),
            "max_bytes": self.max_bytes,
            # JetStream refuses a duplicate window longer than the stream keeps messages.
            "duplicate_window": _ns(min(self.duplicate_window, self.max_age)),
        }

    def lacks(self, health: StreamHealth, refused: Collection[str] = ()) -> list[str]:
        """What the stream as `health` describes it lacks of this spec (empty: nothing), but for the `refused`
        subjects (`Bus.ensure_stream` could not add them)."""
        out = [
            f"subject {s!r}"
            for s in self.subjects
            if s not in refused and not any(covers(have, s) for have in health.subjects)
        ]
        if health.replicas < self.replicas:
            out.append(f"{self.replicas} replicas (it has {health.replicas})")
        if 0 < health.max_age < self.max_age:
            out.append(f"max_age {self.max_age:g} s (it has {health.max_age:g} s)")
        if 0 <= health.max_bytes and (self.max_bytes < 0 or health.max_bytes < self.max_bytes):
            out.append(f"max_bytes {self.max_bytes} (it has {health.max_bytes})")
        return out


class StreamHealth(msgspec.Struct, frozen=True, kw_only=True):
    """A stream as `Bus.check_stream` found it."""

    subjects: list[str]
    replicas: int
    #: Seconds; 0 is unlimited.
    max_age: float
    #: -1 is unlimited.
    max_bytes: int
    leader: str
    #: Replicas that are not current: down, or catching up.
    lagging: list[str]


_json = msgspec.json.Encoder()


class _NotFound(ConfigError):
    pass


class _Raced(ConfigError):
    pass


class _Busy(ConfigError):
    """JetStream cannot do it now, but will soon (a move or an election under way)."""


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _widened(current: dict[str, Any], spec: StreamSpec) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """`current` (a stream configuration) widened to hold `spec`: the new configuration, the subjects that
    cannot be added (with the reason), and the settings kept because they are wider than asked (described)."""
    config = dict(current)
    kept: list[str] = []
    merged, refused = stream_subjects(current.get("subjects") or [], spec.subjects)
    config["subjects"] = merged
    replicas = int(current.get("num_replicas") or 1)
    config["num_replicas"] = max(replicas, spec.replicas)
    if replicas > spec.replicas:
        kept.append(f"{replicas} replicas (asked for {spec.replicas})")
    age = int(current.get("max_age") or 0)  # 0: unlimited
    if age and age < _ns(spec.max_age):
        config["max_age"] = age = _ns(spec.max_age)
    elif age != _ns(spec.max_age):
        kept.append(f"max_age {age / 1e9:g} s (asked for {spec.max_age:g} s; 0 is unlimited)")
    size = int(current.get("max_bytes") or -1)  # -1: unlimited
    if size >= 0 and (spec.max_bytes < 0 or size < spec.max_bytes):
        config["max_bytes"] = spec.max_bytes
    elif size != spec.max_bytes:
        kept.append(f"max_bytes {size} (asked for {spec.max_bytes}; -1 is unlimited)")
    window = int(current.get("duplicate_window") or 0)
    wanted_window = _ns(spec.duplicate_window)
    if age:
        wanted_window = min(wanted_window, age)
    if window < wanted_window:
        config["duplicate_window"] = wanted_window
    return config, refused, kept


def _api_error(exc: nats.js.errors.APIError, what: str, spec: StreamSpec | None) -> ConfigError:
    """The JetStream error `exc` as eventfn's, saying what to do about it."""
    if exc.code == 404:
        return _NotFound("JetStream", f"cannot {what}: {exc.description}")
    if exc.err_code == 10058:  # stream name already in use with a different configuration
        return _Raced("JetStream", f"cannot {what}: {exc.description}")
    if exc.err_code == 10065:  # subjects overlap with an existing stream
        return ConfigError(
            "JetStream",
            f"cannot {what}: another stream on this server already stores some of these subjects",
            "give eventfn subjects no other stream holds with [stream] subjects in eventfn.toml",
        )
    if spec is None and (exc.err_code in (10005, 10023) or exc.code == 503):
        # A consumer has its stream's replicas: no place for it means the stream's servers are changing (an
        # operator just raised its replicas, a server is down), which passes.
        return _Busy(
            "JetStream",
            f"cannot {what} now: {exc.description} (the stream's replicas are moving, or a server is down)",
        )
    replicas = spec.replicas if spec else 1
    if exc.err_code == 10074:  # replicas > 1 not supported in non-clustered mode
        return ConfigError(
            "JetStream",
            f"cannot {what} with {replicas} replicas: this NATS server is not part of a cluster",
            "set [stream] replicas = 1 (and [dlq] replicas) in eventfn.toml, or connect to a cluster",
        )
    if exc.err_code in (10005, 10023):  # no suitable peers for placement, insufficient resources
        return ConfigError(
            "JetStream",
            f"cannot {what} with {replicas} replicas: {exc.description} (fewer JetStream servers are up in the "
            "cluster, or they lack storage)",
            "bring the cluster's servers up, or lower [stream] replicas / [dlq] replicas in eventfn.toml",
        )
    return ConfigError("JetStream", f"cannot {what}: {exc.description} (code {exc.err_code})")


def _filter_fields(subjects: Sequence[str]) -> dict[str, Any]:
    # One filter goes in filter_subject, which every server version understands.
    if len(subjects) == 1:
        return {"filter_subject": subjects[0]}
    return {"filter_subjects": list(subjects)}


@asynccontextmanager
async def connect(
    urls: Sequence[str],
    settings: NatsSettings,
    *,
    name: str = "eventfn",
    connect_timeout: float = 5.0,
    fix: str = "check the URL and that the server is running, or omit --nats to start an embedded server",
) -> AsyncIterator[Bus]:
    """Connect to NATS (any of `urls`); raises `NatsUnavailable` with the reason and `fix` when it cannot."""
    options: dict[str, Any] = {
        "servers": list(urls),
        "name": name,
        # Replies come to this prefix: the NATS user must be allowed to subscribe to `<prefix>.>`, and no one
        # else should be (README "Security and isolation").
        "inbox_prefix": settings.inbox_prefix or INBOX_PREFIXES[SERVICE],
        "connect_timeout": connect_timeout,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
    }
    if settings.creds:
        options["user_credentials"] = settings.creds
    if settings.token:
        options["token"] = settings.token
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password or ""
    if settings.tls_ca or settings.tls_cert:
        context = ssl.create_default_context(cafile=settings.tls_ca)
        if settings.tls_cert:
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
        options["tls"] = context
    where = ",".join(redact(u) for u in urls)
    hooks: list[Callable[[], None]] = []
    denials = Denials()
    try:
        nc = await _first_connect(options, hooks, denials)
    except ConnectionError as exc:
        if "authorization violation" in str(exc).lower():
            raise NatsUnavailable(
                where,
                "the server refused these credentials",
                "check the user and password, token or creds file; the embedded server's are in "
                "<data dir>/auth/ (README: Security and isolation)",
            ) from exc
        raise NatsUnavailable(where, f"cannot connect: {exc}", fix) from exc
    bus = Bus(nc, _server_of(nc, where), hooks, denials)
    try:
        yield bus
    except TimeoutError as exc:
        # A JetStream call the server refused shows up as a timeout (JetStream's is 5 s); the refusal came
        # before it, as an error of its own.
        if time.monotonic() - denials.at < 15.0:
            raise PermissionDenied(bus.url, denials.last) from exc
        raise
    finally:
        with anyio.CancelScope(shield=True):
            if not nc.is_closed:
                try:
                    await nc.drain()
                except (nats.errors.Error, TimeoutError):
                    try:
                        await nc.close()
                    except (OSError, nats.errors.Error):
                        pass  # the connection was already lost (the server died): nothing left to close


def _server_of(nc: Client, default: str = "the NATS server") -> str:
    """The server `nc` is (or was last) connected to, as a URL without credentials: nats-py keeps the URL as
    given, `nats://user:password@host`, and it goes to the log."""
    return redact(nc.connected_url.geturl()) if nc.connected_url else default


async def _first_connect(
    options: dict[str, Any], reconnect_hooks: list[Callable[[], None]], denials: Denials
) -> Client:
    """Connect once, failing fast (a wrong URL is a user error); once connected, reconnects retry forever."""
    nc = Client()
    first_errors: list[str] = []
    established = False

    # Without these callbacks nats-py prints every reconnect attempt's traceback to stderr.
    async def on_error(exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        if "permissions violation" in text:
            denials.add(text.removeprefix("nats: "))
        if not established:
            first_errors.append(text)  # still connecting for the first time: reported by the raise below
        elif not (nc.is_closed or nc.is_draining):
            log.warning("NATS: %s", text)

    async def on_disconnected() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("NATS: disconnected from %s; reconnecting", _server_of(nc))

    async def on_reconnected() -> None:
        log.info("NATS: reconnected to %s", _server_of(nc))
        for hook in list(reconnect_hooks):
            hook()

    try:
        await nc.connect(
            **{
                **options,
                "max_reconnect_attempts": 1,
                "allow_reconnect": False,
                "error_cb": on_error,
                "disconnected_cb": on_disconnected,
                "reconnected_cb": on_reconnected,
            }
        )
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        raise ConnectionError(first_errors[-1] if first_errors else (str(exc) or type(exc).__name__)) from exc
    established = True
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = -1
    return nc
