"""Pull feeds: a durable consumer's messages as `Delivery` objects, hand-pipelined.

As measured in ../shared/reference/nats-performance.md: a raw subscription on an inbox with pull requests kept
outstanding, a new request sent as soon as half the credit is used, so the consumer never waits for a round
trip between batches (the stock `fetch()` loop costs 4x the ceiling). An exclusive consumer (JetStream's
pinned client) is pulled in its priority group, and the feed keeps, hands over or loses its pin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from eventfn.broker.specs import _ns
from eventfn.broker.stalls import Stalls

log = logging.getLogger(__name__)

_json = msgspec.json.Encoder()

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
#: Seconds a stopping feed's hand-back waits for the feed's UNSUB (it comes at the feed loop's next turn).
_UNSUBSCRIBE_WAIT = 5.0


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
        feed = self._feed
        if feed._stopping and feed._inbox and not feed._unsubscribing.is_set() and not self.settled:
            # Handed back by a stopping feed whose pull requests may still be out: sent after its UNSUB, or
            # JetStream would deliver it again to this feed (one delivery more, counted as an attempt) rather
            # than to the process that takes over.
            with anyio.move_on_after(_UNSUBSCRIBE_WAIT):
                await feed._unsubscribing.wait()
        await self._settle(body)

    async def in_progress(self) -> None:
        """Reset the ack timer: the message is still being worked on."""
        if not self.settled:
            nc = self._feed.nc
            if not queue_publish(nc, self._msg.reply, _WIP):
                await nc.publish(self._msg.reply, _WIP)

    async def _settle(self, body: bytes) -> None:
        if self.settled:
            return
        self.settled = True
        try:
            nc = self._feed.nc
            if not queue_publish(nc, self._msg.reply, body):
                await nc.publish(self._msg.reply, body)
        finally:
            self._feed.released()


def queue_publish(nc: Client, subject: str, body: bytes) -> bool:
    """Append a plain publish (no headers, no reply) to `nc`'s outgoing buffer, without a coroutine; False when
    the client is not plainly connected (reconnecting, draining, closed) or its buffer is full: the caller then
    publishes the ordinary way, which waits or raises as nats-py decides.

    What `Client.publish` does for a connected client, minus its three coroutines, its Future and its subject
    check (`subject` is a reply subject the server gave). nats-py's flusher writes the whole buffer once per
    loop pass, so the acks of one pass go out in one write, after everything published before them: an ack
    still follows the write of its outcome on the same connection.
    """
    try:
        if nc._status != Client.CONNECTED or nc._flusher_task is None or nc._flusher_task.done():
            return False
        flush = nc._flush_queue
        command = b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(body), body)
        size = nc._pending_data_size + len(command)
        if flush is None or (nc._max_pending_size > 0 and size > nc._max_pending_size):
            return False
    except AttributeError:  # a nats-py whose internals differ: the ordinary way, always
        return False
    nc._pending.append(command)
    nc._pending_data_size = size
    stats = nc.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += len(body)
    if flush.empty():
        flush.put_nowait(asyncio.get_running_loop().create_future())  # wake the flusher, as `_flush_pending` does
    return True


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
        idle_expires: float | None = None,
        reconnect_hooks: list[Callable[[], None]] | None = None,
        on_lost: Callable[[], None] | None = None,
        stalls: Stalls | None = None,
        group: str | None = None,
        pin_timeout: float = 10.0,
        on_pin_change: Callable[[bool], None] | None = None,
        on_hand_back: Callable[[list[Delivery]], Awaitable[None]] | None = None,
    ) -> None:
        self.nc = nc
        #: Told of deliveries that arrive after the feed stopped, before they go back unstarted.
        self._on_hand_back = on_hand_back
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
        #: How long a request lasts once the last one brought nothing (None: `expires`): an idle function's feed
        #: then asks a few times a minute rather than every few seconds (a thousand of them add up).
        self.idle_expires = expires if idle_expires is None else max(expires, idle_expires)
        #: The expiry of the requests outstanding; `_idle`: the last request ended having brought nothing.
        self._asked_expires = expires
        self._idle = False
        self._brought = False
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
        #: Set as the feed's UNSUB is written (and when it never runs): from then on a nak cannot come back here.
        self._unsubscribing = anyio.Event()
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

    def waiting(self) -> list[Delivery]:
        """Deliveries received and not yet taken, oldest first."""
        waiting: deque[Delivery | None] = self._queue._queue  # type: ignore[attr-defined]  # asyncio.Queue's own
        return [d for d in waiting if d is not None]

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
                wait = self._asked_expires + 2.0
                if (held := self._retry_at - time.monotonic()) > 0:
                    wait = held
                elif want >= self._threshold or (want > 0 and self.outstanding == 0):
                    if self.group is None:
                        expires = self.idle_expires if self._idle else self.expires
                        # A request is presumed lost once the longest of those out should have ended.
                        self._asked_expires = expires if self.outstanding == 0 else max(self._asked_expires, expires)
                        self._brought = False
                        body = _pull_request.encode(PullRequest(batch=want, expires=int(expires * 1e9)))
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
                if self.outstanding and time.monotonic() - self._heard > self._asked_expires + 2.0:
                    # Neither messages nor the request's 408 came back: the request was lost (reconnect,
                    # server restart, the consumer's leader lost). Ask again rather than wait forever.
                    self.outstanding = 0
                    self._idle = False
                    self._trouble(f"no answer to a pull request in {self._asked_expires + 2.0:.0f} s")
        finally:
            self._stalls.forget(self._stall_key)
            self._hooks.remove(self._requests_lost)
            with anyio.CancelScope(shield=True):
                try:
                    # Drain, not unsubscribe: the server stops serving our pull requests once it has our
                    # UNSUB (it checks interest), and the flush inside drain brings in whatever it sent
                    # before that. Those arrive through `_on_message` and are handed back with a nak
                    # instead of sitting unacknowledged until their ack wait runs out.
                    # Set first, as drain writes its UNSUB before it first yields: the naks waiting for this go
                    # out after it on the same connection, so JetStream sends them to another feed.
                    self._unsubscribing.set()
                    await sub.drain()  # type: ignore[no-untyped-call]
                except nats.errors.Error:
                    pass
                self._unsubscribing.set()
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
        self._idle = False
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
                self._idle = status == "408" and not self._brought
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
        self._brought = True
        self._idle = False
        self.outstanding = max(0, self.outstanding - 1)
        self.inflight += 1
        delivery = Delivery(msg, self)
        if self._closed or self._queue.qsize() >= 2 * self.max_inflight:
            if self._on_hand_back is not None:
                try:
                    await self._on_hand_back([delivery])
                except Exception as exc:  # it goes back all the same
                    log.warning("consumer %s/%s: hand-back not noted: %s", self.stream, self.consumer, exc)
            await delivery.nak()
        else:
            self._queue.put_nowait(delivery)
