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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.streams.memory import MemoryObjectReceiveStream
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StreamConfig

from eventfn.auth import INBOX_PREFIXES, SERVICE, redact
from eventfn.config import NatsSettings
from eventfn.errors import ConfigError, NatsUnavailable, PermissionDenied

log = logging.getLogger(__name__)

_ACK = b"+ACK"
_WIP = b"+WPI"
_pull_request = msgspec.json.Encoder()


class PullRequest(msgspec.Struct, frozen=True):
    """The body of `$JS.API.CONSUMER.MSG.NEXT`: how many messages, and for how long (ns)."""

    batch: int
    expires: int


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
    """A pipelined pull consumer: yields at most `max_inflight` unsettled deliveries at a time."""

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
    ) -> None:
        self.nc = nc
        self._hooks = reconnect_hooks if reconnect_hooks is not None else []
        self._on_lost = on_lost
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
        """Keep pull requests outstanding until `stop()`; then stop receiving."""
        inbox = self.nc.new_inbox()
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}"
        sub = await self.nc.subscribe(inbox, cb=self._on_message, pending_msgs_limit=-1, pending_bytes_limit=-1)
        self._hooks.append(self._requests_lost)
        task_status.started()
        try:
            while not self._stopping:
                want = self.max_inflight - self.outstanding - self.inflight
                if want >= self._threshold or (want > 0 and self.outstanding == 0):
                    body = _pull_request.encode(PullRequest(batch=want, expires=int(self.expires * 1e9)))
                    await self.nc.publish(subject, body, reply=inbox)
                    self.outstanding += want
                    self._heard = time.monotonic()
                with anyio.move_on_after(self.expires + 2.0):
                    await self._wake.wait()
                self._wake = anyio.Event()
                if self.outstanding and time.monotonic() - self._heard > self.expires + 2.0:
                    # Neither messages nor the request's 408 came back: the request was lost (reconnect,
                    # server restart). Ask again rather than wait forever.
                    self.outstanding = 0
        finally:
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
                    log.warning(
                        "pull request on %s/%s ended: %s", self.stream, self.consumer, headers.get("Description", "")
                    )
                self._wake.set()
            if self._on_lost and (status == "503" or headers.get("Description") == "Consumer Deleted"):
                # No consumer answers the request (503), or it was deleted under us: its stream or it may be
                # gone. The owner checks and re-creates them, then refreshes the feeds; until then a request
                # that found nobody waits out its expiry, as any lost request does.
                self._on_lost()
            return
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
                log.warning("request on %s named reply subject %r: not answered there", self.subject, self.reply)
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


#: "Paused until" far enough away to mean: until resumed.
_PAUSED_FOREVER = "2200-01-01T00:00:00Z"


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
        try:
            ack = await self.js.publish(subject, data, headers=headers, timeout=timeout)
        except nats.js.errors.NoStreamResponseError:
            self._lost()  # no stream stores the subject: it may have been deleted
            raise
        return ack.seq

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
    ) -> None:
        """Create the stream, or update it so that its settings are exactly these."""
        config = StreamConfig(
            name=name,
            subjects=list(subjects),
            retention=RetentionPolicy.LIMITS,
            max_age=max_age,
            max_bytes=max_bytes,
            discard=DiscardPolicy.OLD,
            duplicate_window=duplicate_window,
        )
        try:
            info = await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:
            await self._js_call(self.js.add_stream(config), f"create stream {name}")
            return
        current = info.config
        if (
            sorted(current.subjects or []) != sorted(subjects)
            or current.max_age != max_age
            or (current.max_bytes or -1) != max_bytes
            or current.duplicate_window != duplicate_window
        ):
            await self._js_call(self.js.update_stream(config), f"update stream {name}")

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
        from_start: bool = False,
    ) -> None:
        """Create the durable pull consumer, or update its editable settings (filters, ack wait, limits).

        A new consumer starts at new messages (Lambda's LATEST), or with `from_start` at the first stored
        one; an existing one resumes where it left off. An update leaves a consumer's pause state as it is.
        """
        try:
            policy = (await self.js.consumer_info(stream, name)).config.deliver_policy  # fixed at creation
        except nats.js.errors.NotFoundError:
            policy = DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
        config = ConsumerConfig(
            durable_name=name,
            description=description or None,
            deliver_policy=policy,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=max_ack_pending,
            max_waiting=512,
            metadata=metadata,
            **_filter_fields(filter_subjects),
        )
        await self._js_call(self.js.add_consumer(stream, config), f"provision consumer {stream}/{name}")

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

    def pull_feed(self, stream: str, consumer: str, *, max_inflight: int) -> PullFeed:
        """A pipelined feed on an existing durable consumer (run it with `PullFeed.run`)."""
        return PullFeed(
            self.nc,
            stream,
            consumer,
            max_inflight=max_inflight,
            reconnect_hooks=self._reconnect_hooks,
            on_lost=self._lost,
        )

    def refresh_feeds(self) -> None:
        """Have every running feed send fresh pull requests now (after its consumer was re-created)."""
        for hook in list(self._reconnect_hooks):
            hook()

    @staticmethod
    async def _js_call(call: Awaitable[Any], what: str) -> Any:
        try:
            return await call
        except nats.js.errors.APIError as exc:
            if exc.err_code == 10065:  # subjects overlap with an existing stream
                raise ConfigError(
                    "JetStream",
                    f"cannot {what}: another stream on this server already stores some of these subjects",
                    "give eventfn subjects no other stream holds with [stream] subjects in eventfn.toml",
                ) from exc
            raise ConfigError("JetStream", f"cannot {what}: {exc.description} (code {exc.err_code})") from exc


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
    bus = Bus(nc, redact(nc.connected_url.geturl()) if nc.connected_url else where, hooks, denials)
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
            log.warning("NATS: disconnected from %s; reconnecting", nc.connected_url)

    async def on_reconnected() -> None:
        log.info("NATS: reconnected to %s", nc.connected_url)
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
