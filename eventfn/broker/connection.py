"""Connecting to NATS: one `Bus` per connection, with eventfn's reconnect, TLS and credential handling, and
errors a user can act on when the first connect fails."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from eventfn.broker.auth import INBOX_PREFIXES, SERVICE, redact
from eventfn.broker.bus import Bus, Denials
from eventfn.config import NatsSettings
from eventfn.errors import NatsUnavailable, PermissionDenied

log = logging.getLogger(__name__)


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


class _Client(Client):
    """nats-py's client, reading a subject or reply subject that is not UTF-8 with U+FFFD for the bad bytes.
    nats-server passes any bytes on, and nats-py's own strict decode raised inside its reader, which then stopped
    for good: one hostile `PUB` on a subject the service consumes (a sharded stream's `eventfn.stream.<name>.<key>`)
    left the connection deaf, and the message came back after every reconnect."""

    def _build_message(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> Msg:
        return self.msg_class(
            subject=subject.decode(errors="replace"),
            reply=reply.decode(errors="replace"),
            data=data,
            headers=headers,
            _client=self,
            _sid=sid,
        )


def _server_of(nc: Client, default: str = "the NATS server") -> str:
    """The server `nc` is (or was last) connected to, as a URL without credentials: nats-py keeps the URL as
    given, `nats://user:password@host`, and it goes to the log."""
    return redact(nc.connected_url.geturl()) if nc.connected_url else default


async def _first_connect(
    options: dict[str, Any], reconnect_hooks: list[Callable[[], None]], denials: Denials
) -> Client:
    """Connect once, failing fast (a wrong URL is a user error); once connected, reconnects retry forever."""
    nc = _Client()
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
