"""`Bus`: provisioning, publishing and requests over one NATS connection. With `feeds` (pull feeds) and
`connection` (connecting), the only code that speaks NATS.

nats-py is asyncio-only and large; everything else in eventfn sees the small types defined here and in
`specs` and `feeds` (`Request`, `Delivery`, `PullFeed`, `StreamSpec`, `ConsumerOptions`) and stays plain anyio.
"""

from __future__ import annotations

import asyncio
import logging
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
from nats.js.api import ConsumerInfo, PubAck

from eventfn import events
from eventfn.broker.feeds import Delivery, PullFeed
from eventfn.broker.specs import (
    _DEFAULT_OPTIONS,
    _FIXED_AT_CREATION,
    ConsumerOptions,
    ConsumerState,
    StoredRecord,
    StreamHealth,
    StreamSpec,
    _ns,
)
from eventfn.broker.stalls import Stalls
from eventfn.errors import ConfigError, NatsUnavailable, PermissionDenied
from eventfn.subjects import stream_subjects

log = logging.getLogger(__name__)

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


#: Seconds a feed's pull request lasts once the last one brought nothing (5 s while events come): a thousand idle
#: functions' feeds then cost the server and the service a few dozen requests a second, not hundreds. A request
#: lost without a word (a cluster's consumer leader lost) is asked again this much later; a reconnect, a deleted
#: consumer and a resumed one have their feeds ask again at once.
IDLE_PULL_EXPIRES = 30.0

#: What JetStream API calls that time out stall (`Bus.stalls` key).
_API = "JetStream API"

#: "Paused until" far enough away to mean: until resumed.
_PAUSED_FOREVER = "2200-01-01T00:00:00Z"


class Unread:
    """The type of `UNREAD`."""


#: `Bus.ensure_consumer(current=UNREAD)`: the caller did not read the consumer's configuration.
UNREAD = Unread()


class Published(msgspec.Struct, frozen=True):
    """What JetStream answered to a stored publish."""

    #: The message's stream sequence (of the first one, for a duplicate).
    seq: int
    #: JetStream had a message with this id within the stream's duplicate window, and dropped this one.
    duplicate: bool


class Pending:
    """A stored publish sent and not yet acknowledged (`Bus.publish_soon`)."""

    def __init__(self, future: asyncio.Future[PubAck]) -> None:
        self._future = future

    async def stored(self, timeout: float) -> Published:
        """Wait until JetStream has the message; raises `TimeoutError`, or the error JetStream answered."""
        future = self._future
        if not future.done():  # (most are, in a pipeline: no wait, no scope)
            try:
                with anyio.fail_after(timeout):
                    await future
            except TimeoutError:
                future.cancel()  # frees its place among nats-py's pending publishes
                raise
        ack = future.result()
        return Published(seq=ack.seq, duplicate=bool(ack.duplicate))


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

    async def flush(self, timeout: int = 5) -> None:
        """Wait until the server has read everything sent so far (acknowledgements included): a round trip."""
        await self.nc.flush(timeout)

    async def publish_soon(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> Pending:
        """Send a stored publish without waiting for its acknowledgement (await `Pending.stored` for that): many
        can be outstanding at once, and JetStream stores them in the order of the calls."""
        return Pending(await self.js.publish_async(subject, data, headers=headers))

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
            try:  # without the checkpoint of `send` (a loop pass per request) while there is room
                send.send_nowait(Request(nc, msg))
            except anyio.WouldBlock:
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
        current: dict[str, Any] | Unread | None = UNREAD,
    ) -> dict[str, Any] | None:
        """Create the durable pull consumer, or update its editable settings (filters, ack wait, limits, max
        deliveries, exclusive or not); returns the configuration it had before (None: it is new).

        A new consumer starts where `options.start_position` says, or with `from_start` at the first stored
        message (after its stream was re-created); an existing one resumes where it left off and keeps its ack
        policy (JetStream fixes both at creation). An update leaves a consumer's pause state as it is, and its
        replicas: by default a consumer has as many as its stream (it follows when the stream's change), so its
        acknowledgements survive what the stream survives; a count an operator set stays. Metadata an operator
        added stays too. A consumer that already has every setting asked for is not written at all (a restart
        leaves its consumers be). `current`: its configuration as the caller just read it (`consumer_configs`;
        None: it does not exist), which saves reading it here.
        """
        replicas = 0  # as many as the stream
        had: dict[str, Any] | None
        if isinstance(current, Unread):
            # Read and written as JetStream's JSON: nats-py's consumer types drop the priority settings.
            try:
                info = await self._js_call(
                    self._api(f"CONSUMER.INFO.{stream}.{name}", None), f"read consumer {stream}/{name}"
                )
            except _NotFound:
                had = None
            else:
                had = info["config"]
        else:
            had = current
        if had is None:
            fixed = {**options.start_fields(from_start), "ack_policy": options.ack}
        else:
            fixed = {k: had[k] for k in _FIXED_AT_CREATION if k in had}
            if fixed.get("ack_policy", "explicit") != options.ack:
                log.warning(
                    "consumer %s/%s keeps ack policy %s (asked for %s): JetStream fixes it at creation; delete the "
                    "consumer to change it",
                    stream,
                    name,
                    fixed.get("ack_policy"),
                    options.ack,
                )
            replicas = int(had.get("num_replicas") or 0)
            metadata = {**_own_metadata(had), **(metadata or {})} or None
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
        if had is not None and _has_all(had, config):
            return had
        request = {"stream_name": stream, "config": config}
        what = f"provision consumer {stream}/{name}"
        for delay in (0.25, 0.5, 1.0, 2.0, 4.0):  # about 8 s for JetStream to finish what it is busy with
            try:
                await self._js_call(self._api(f"CONSUMER.CREATE.{stream}.{name}", request), what)
                return had
            except _Busy:
                await anyio.sleep(delay)
        await self._js_call(self._api(f"CONSUMER.CREATE.{stream}.{name}", request), what)
        return had

    async def consumer_configs(self, stream: str) -> dict[str, dict[str, Any]]:
        """Every durable consumer of `stream` by name, with its configuration as JetStream's JSON (none if the
        stream does not exist): a page of 256 per request, where reading them one by one takes a round trip each."""
        configs: dict[str, dict[str, Any]] = {}
        while True:
            try:
                page = await self._js_call(
                    self._api(f"CONSUMER.LIST.{stream}", {"offset": len(configs)}), f"list consumers of {stream}"
                )
            except _NotFound:
                return configs
            infos = page.get("consumers") or []
            for info in infos:
                configs[info["name"]] = info["config"]
            if not infos or len(configs) >= int(page.get("total") or 0):
                return configs

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
        return _consumer_state(info)

    async def consumer_states(self, stream: str) -> dict[str, ConsumerState]:
        """`consumer_state` of every consumer of `stream`, by name (none if the stream does not exist)."""
        try:
            infos = await self.js.consumers_info(stream)
        except nats.js.errors.NotFoundError:
            return {}
        return {info.name: _consumer_state(info) for info in infos}

    async def subject_counts(self, stream: str, subjects_filter: str = ">") -> dict[str, int] | None:
        """How many messages `stream` holds on each subject `subjects_filter` matches; None if it does not exist."""
        try:
            info = await self.js.stream_info(stream, subjects_filter=subjects_filter)
        except nats.js.errors.NotFoundError:
            return None
        return dict(info.state.subjects or {})

    async def allow_message_ttl(self, stream: str) -> None:
        """Let `stream`'s messages carry a TTL of their own (`Nats-TTL`; JetStream cannot take it back)."""
        info = await self._stream_info(stream)
        if info is None:
            raise ConfigError("JetStream", f"cannot allow message TTLs on stream {stream}: it does not exist")
        config = info["config"]
        if not config.get("allow_msg_ttl"):
            config["allow_msg_ttl"] = True
            await self._js_call(self._api(f"STREAM.UPDATE.{stream}", config), f"update stream {stream}", None)

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
                    timestamp=raw.time.timestamp() if raw.time else 0.0,
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
        on_hand_back: Callable[[list[Delivery]], Awaitable[None]] | None = None,
    ) -> PullFeed:
        """A pipelined feed on an existing durable consumer (run it with `PullFeed.run`), provisioned with
        `options`: on an exclusive consumer it pulls in its group, and `on_pin_change` hears whether it is the one
        process that consumes it; `on_hand_back` hears of deliveries that came after it stopped, before they go
        back unstarted."""
        return PullFeed(
            self.nc,
            stream,
            consumer,
            max_inflight=max_inflight,
            idle_expires=IDLE_PULL_EXPIRES,
            reconnect_hooks=self._reconnect_hooks,
            on_lost=self._lost,
            stalls=self.stalls,
            group=options.group,
            pin_timeout=options.pin_timeout,
            on_pin_change=on_pin_change,
            on_hand_back=on_hand_back,
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


_json = msgspec.json.Encoder()


class _NotFound(ConfigError):
    pass


class _Raced(ConfigError):
    pass


class _Busy(ConfigError):
    """JetStream cannot do it now, but will soon (a move or an election under way)."""


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
    consumers = int(current.get("max_consumers") or -1)
    # Raised where the stream names a lower cap; a stream that names none (-1: the server's default, 1,000 on
    # nats-server 2.15) is left alone, as servers before 2.12 refuse any change of it.
    if 0 < consumers < spec.max_consumers:
        config["max_consumers"] = spec.max_consumers
    if spec.allow_schedules and not current.get("allow_msg_schedules"):
        config["allow_msg_schedules"] = True
    if current.get("retention", "limits") != spec.retention:
        kept.append(f"retention {current.get('retention')} (asked for {spec.retention}; fixed at creation)")
    return config, refused, kept


class ConsumerTaken(ConfigError):
    """A work-queue stream (a queue's) refused a consumer: another one already takes those subjects."""


def _api_error(exc: nats.js.errors.APIError, what: str, spec: StreamSpec | None) -> ConfigError:
    """The JetStream error `exc` as eventfn's, saying what to do about it."""
    if exc.err_code == 10100:  # filtered consumer not unique on workqueue stream
        return ConsumerTaken("JetStream", f"cannot {what}: another consumer already takes its messages")
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
    if exc.err_code == 10026:  # maximum consumers limit reached
        return ConfigError(
            "JetStream",
            f"cannot {what}: {exc.description} (every function and mapping has a consumer of its own, and the "
            "stream was made with a lower cap, or nats-server's default of 1,000 applies to it)",
            "raise the stream's cap: `nats stream edit EVENTFN --max-consumers 100000` (nats-server 2.12 or later)",
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


def _consumer_state(info: ConsumerInfo) -> ConsumerState:
    return ConsumerState(
        paused=bool(info.paused),
        pending=info.num_pending or 0,
        ack_pending=info.num_ack_pending or 0,
        redelivered=info.num_redelivered or 0,
        delivered_stream_seq=(info.delivered.stream_seq or 0) if info.delivered else 0,
        ack_floor_stream_seq=(info.ack_floor.stream_seq or 0) if info.ack_floor else 0,
    )


def _own_metadata(config: dict[str, Any]) -> dict[str, str]:
    """A consumer's metadata but the `_nats.` keys, which the server sets itself on every update."""
    return {k: v for k, v in (config.get("metadata") or {}).items() if not k.startswith("_nats.")}


def _has_all(current: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a consumer configured as `current` already has every setting of `wanted`."""
    for key, value in wanted.items():
        have = _own_metadata(current) if key == "metadata" else current.get(key)
        if have != value:
            return False
    # A setting asked for before and not now (a filter list that became one filter, priority groups dropped).
    return all(key in wanted for key in ("filter_subjects", "filter_subject", "priority_groups") if current.get(key))


def _filter_fields(subjects: Sequence[str]) -> dict[str, Any]:
    # One filter goes in filter_subject, which every server version understands.
    if len(subjects) == 1:
        return {"filter_subject": subjects[0]}
    return {"filter_subjects": list(subjects)}
