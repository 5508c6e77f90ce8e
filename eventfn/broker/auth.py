"""Access control on NATS: the roles, their permissions, and the credentials of the embedded server.

Three roles, each a NATS user with its own permissions (README "Security and isolation" says what each
guarantees, and `deploy/nats-server.conf` sets them up on a NATS you run yourself):

- **service**: what `eventfn serve` needs. The JetStream API of its two streams and their consumers, acks,
  the invoke and control-API queue groups, replies (NATS `allow_responses`), DLQ writes, and publishing to
  the stream's subjects (destinations, chained events).
- **admin**: the control API (`eventfn functions`, `mappings`), the DLQ (read, redrive, purge), and
  everything an invoker may do. The CLI connects as admin.
- **invoker**: publish to `eventfn.invoke.*`, `eventfn.async.*` and the stream's subjects, and receive
  replies in its own inbox prefix. Clients without credentials on the embedded server get the same
  publish rights (NATS `no_auth_user`), with replies on the default `_INBOX.` prefix.

Every role subscribes only under its own inbox prefix, so the service's pull deliveries and the admin's DLQ
reads never pass through `_INBOX.>`, the one prefix that every anonymous client may read.

The embedded server's credentials are files in `<data_dir>/auth/` (0700), one per role (0600), in the nats
CLI's context format (`nats --context <data_dir>/auth/admin.json ...` uses one as is). Passwords are made
once and kept across restarts; the URL in them is rewritten at each start.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec

from eventfn import subjects
from eventfn.config import AuthSettings, NatsSettings, ServiceConfig, all_queues, valid_subject
from eventfn.errors import ConfigError
from eventfn.subjects import reserved_overlap

SERVICE: Final = "service"
ADMIN: Final = "admin"
INVOKER: Final = "invoker"
#: The user that clients without credentials are (NATS `no_auth_user`); it has no credentials file.
ANONYMOUS: Final = "anonymous"
ROLES: Final = (SERVICE, ADMIN, INVOKER)

#: Each role's reply subjects start with its own prefix; clients without credentials keep NATS's default.
INBOX_PREFIXES: Final = {
    SERVICE: subjects.SERVICE_INBOX,
    ADMIN: subjects.ADMIN_INBOX,
    INVOKER: subjects.INVOKER_INBOX,
    ANONYMOUS: "_INBOX",
}
#: The directory under the data directory that holds the credentials files.
AUTH_DIR: Final = "auth"
#: How long the service may take to answer a request it received: the longest function timeout (900 s) plus
#: a cold start and the queueing in front of it. A reply later than this is refused by the server.
REPLY_WINDOW: Final = "20m"

log = logging.getLogger(__name__)

_EVENTS = subjects.EVENTS_STREAM
_DLQ = subjects.DLQ_STREAM
_STATE = subjects.STATE_STREAM
_STATE_BUCKET = subjects.STATE_BUCKET


class Permissions(msgspec.Struct, frozen=True, kw_only=True):
    """One NATS user's permissions: subjects it may publish to and subscribe to (allow lists)."""

    publish: list[str]
    subscribe: list[str]
    #: May answer the requests it receives (once each, within `REPLY_WINDOW`), whatever their reply subject.
    allow_responses: bool = False


def resource_streams(config: ServiceConfig) -> list[str]:
    """The JetStream streams of the queues and sharded streams `config` declares (`resource_rights`)."""
    streams = [subjects.queue_stream(name) for name in all_queues(config)]
    for name in config.streams:
        streams += [subjects.data_stream(name), subjects.ingest_stream(name)]
    return streams


def resource_rights(role: str, streams: Sequence[str]) -> list[str]:
    """What `role` may publish to on the queues' and sharded streams' JetStream `streams` (one per queue, two per
    sharded stream; their names come from `eventfn.toml`, so each is listed, not matched by a wildcard that would
    reach other streams). The service provisions and consumes them, and moves messages to a queue's DLQ; the
    admin reads, purges and redrives them (`eventfn queue`, `eventfn stream`)."""
    if role == SERVICE:
        verbs = ("INFO", "PAUSE", "MSG.NEXT", "UNPIN")
        return [
            subjects.QUEUE_PREFIX + ">",
            subjects.SHARD_PREFIX + ">",
            *(
                right
                for stream in streams
                for right in (
                    *(f"$JS.API.STREAM.{verb}.{stream}" for verb in ("INFO", "CREATE", "UPDATE")),
                    f"$JS.API.CONSUMER.CREATE.{stream}",
                    f"$JS.API.CONSUMER.CREATE.{stream}.>",
                    f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.*",
                    *(f"$JS.API.CONSUMER.{verb}.{stream}.*" for verb in verbs),
                    *(f"$JS.API.CONSUMER.{verb}.{stream}" for verb in ("NAMES", "LIST")),
                    f"$JS.ACK.{stream}.>",
                    f"$JS.ACK.*.*.{stream}.>",
                )
            ),
        ]
    if role == ADMIN:
        return [
            subjects.QUEUE_PREFIX + ">",
            subjects.STREAM_PREFIX + ">",
            subjects.SHARD_PREFIX + ">",
            *(
                right
                for stream in streams
                for right in (
                    *(f"$JS.API.STREAM.{verb}.{stream}" for verb in ("INFO", "MSG.GET", "MSG.DELETE", "PURGE")),
                    f"$JS.API.DIRECT.GET.{stream}",
                    f"$JS.API.DIRECT.GET.{stream}.>",
                    f"$JS.API.CONSUMER.INFO.{stream}.*",
                    # A queue's one consumer, left by a renamed trigger, is removed by hand (`nats consumer rm`).
                    f"$JS.API.CONSUMER.DELETE.{stream}.*",
                    *(f"$JS.API.CONSUMER.{verb}.{stream}" for verb in ("NAMES", "LIST")),
                )
            ),
        ]
    # Invokers (and clients without credentials, where they may publish) send to queues and put to streams.
    return [subjects.QUEUE_PREFIX + ">", subjects.STREAM_PREFIX + ">"] if streams else []


def permissions(
    role: str, trigger_subjects: Sequence[str], extra_publish: Sequence[str] = (), resources: Sequence[str] = ()
) -> Permissions:
    """The permissions of `role`; `trigger_subjects` are the events stream's (`[stream] subjects`), `resources`
    the queues' and sharded streams' JetStream streams (`resource_streams`)."""
    events = [*trigger_subjects, *extra_publish, *resource_rights(role, resources)]
    invoke = [subjects.INVOKE_PREFIX + "*", subjects.ASYNC_PREFIX + "*"]
    inbox = [INBOX_PREFIXES[role] + ".>"]
    if role == SERVICE:
        return Permissions(
            publish=[
                "$JS.API.INFO",
                *(
                    f"$JS.API.STREAM.{verb}.{stream}"
                    for stream in (_EVENTS, _DLQ)
                    for verb in ("INFO", "CREATE", "UPDATE")
                ),
                f"$JS.API.CONSUMER.CREATE.{_EVENTS}",
                f"$JS.API.CONSUMER.CREATE.{_EVENTS}.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{_EVENTS}.*",
                # UNPIN: a stopping service hands an exclusive consumer (ordered mapping) to a standby.
                *(f"$JS.API.CONSUMER.{verb}.{_EVENTS}.*" for verb in ("INFO", "PAUSE", "MSG.NEXT", "UNPIN")),
                *(f"$JS.API.CONSUMER.{verb}.{_EVENTS}" for verb in ("NAMES", "LIST")),
                # Acks of its deliveries (`$JS.ACK.<stream>.…`, or with domain and account hash first).
                f"$JS.ACK.{_EVENTS}.>",
                f"$JS.ACK.*.*.{_EVENTS}.>",
                subjects.DLQ_PREFIX + ">",
                # Async invokes taken over HTTP (Lambda's `Event` invocation type, webhooks), stored for the
                # function's async mapping; a webhook redelivered reads back the event stored the first time (its id).
                subjects.ASYNC_PREFIX + "*",
                f"$JS.API.STREAM.MSG.GET.{_EVENTS}",
                # What connectors publish (the service publishes for them), and their state in KV.
                subjects.SOURCE_PREFIX + ">",
                *(f"$JS.API.STREAM.{verb}.{_STATE}" for verb in ("INFO", "CREATE", "UPDATE", "MSG.GET")),
                f"$JS.API.DIRECT.GET.{_STATE}.>",
                f"$JS.API.CONSUMER.CREATE.{_STATE}",
                f"$JS.API.CONSUMER.CREATE.{_STATE}.>",
                f"$JS.API.CONSUMER.DELETE.{_STATE}.>",
                # A KV watch (listing a connector's keys) asks after its ordered consumer.
                f"$JS.API.CONSUMER.INFO.{_STATE}.>",
                f"$JS.FC.{_STATE}.>",
                f"$KV.{_STATE_BUCKET}.>",
                *events,
            ],
            subscribe=[subjects.INVOKE_PREFIX + "*", subjects.API_PREFIX + ">", *inbox],
            allow_responses=True,
        )
    if role == ADMIN:
        return Permissions(
            publish=[
                subjects.API_PREFIX + ">",
                *invoke,
                subjects.REDRIVE_PREFIX + ">",
                *events,
                "$JS.API.INFO",
                *(f"$JS.API.STREAM.{verb}.{_DLQ}" for verb in ("INFO", "MSG.GET", "MSG.DELETE", "PURGE")),
                f"$JS.API.DIRECT.GET.{_DLQ}",
                f"$JS.API.DIRECT.GET.{_DLQ}.>",
                # A redrive reads a truncated record's event back from the events stream, and checks that the
                # mapping it goes back through still exists.
                f"$JS.API.STREAM.MSG.GET.{_EVENTS}",
                f"$JS.API.CONSUMER.INFO.{_EVENTS}.*",
            ],
            subscribe=inbox,
        )
    if role in (INVOKER, ANONYMOUS):
        return Permissions(publish=[*invoke, *events], subscribe=inbox)
    raise ValueError(f"unknown role {role!r}")


# -- credentials files ----------------------------------------------------------------------------------


class Context(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A nats CLI context (JSON): a server and how to log in to it. Unknown keys are ignored."""

    description: str = ""
    url: str = ""
    user: str = ""
    password: str = ""
    token: str = ""
    creds: str = ""
    ca: str = ""
    cert: str = ""
    key: str = ""
    inbox_prefix: str = ""


_context_decoder = msgspec.json.Decoder(Context)


def auth_dir(data_dir: Path | str) -> Path:
    """Where the embedded server's credentials files are."""
    return Path(data_dir) / AUTH_DIR


def context_file(data_dir: Path | str, role: str) -> Path:
    """The credentials file of `role` (a nats CLI context)."""
    return auth_dir(data_dir) / f"{role}.json"


def read_context(path: Path) -> Context:
    """Read a nats CLI context file; a missing or broken one is a `ConfigError` naming it."""
    try:
        return _context_decoder.decode(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(str(path), "file not found", "check [nats] context / EVENTFN_NATS_CONTEXT") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read it: {exc.strerror}") from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(str(path), f"not a nats context file: {exc}") from exc


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, readable by this user only (0600) from the first byte on."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _own_passwords(auth: AuthSettings) -> dict[str, str | None]:
    return {SERVICE: auth.service_password, ADMIN: auth.admin_password, INVOKER: auth.invoker_password}


def _check_password(role: str, password: str, where: str) -> None:
    if not password or any(ord(c) < 32 or c == "\x7f" for c in password):
        raise ConfigError(where, f"the {role} password is empty or has control characters")
    if password.startswith("$2"):
        # nats-server takes a password that starts like this for a bcrypt hash.
        raise ConfigError(where, f"the {role} password starts with '$2', which NATS reads as a bcrypt hash")


def load_credentials(data_dir: Path, auth: AuthSettings) -> dict[str, Context]:
    """The credentials of each role: your own passwords from the settings, else those kept in the data
    directory, else new ones (written there). The directory is made private (0700) on the way."""
    directory = auth_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    own = _own_passwords(auth)
    out: dict[str, Context] = {}
    for role in ROLES:
        path = context_file(data_dir, role)
        password = own[role]
        if password is not None:
            _check_password(role, password, f"[nats.auth] {role}_password")
        elif path.exists():
            password = read_context(path).password
            _check_password(role, password, str(path))
        else:
            password = secrets.token_urlsafe(24)
        out[role] = Context(
            description=f"eventfn {role} (written by eventfn serve)",
            user=role,
            password=password,
            inbox_prefix=INBOX_PREFIXES[role],
        )
    return out


def write_credentials(data_dir: Path, credentials: dict[str, Context], url: str) -> None:
    """Write each role's credentials file with the server's `url` (0600)."""
    for role, context in credentials.items():
        data = msgspec.json.format(msgspec.json.encode(msgspec.structs.replace(context, url=url)), indent=2)
        write_private(context_file(data_dir, role), data + b"\n")


# -- the embedded server --------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name to listen on) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def anonymous_allowed(settings: NatsSettings) -> bool:
    """Whether clients without credentials get the invoker role: as set, else only on loopback."""
    if settings.auth.anonymous is not None:
        return settings.auth.anonymous
    return is_loopback(settings.host)


def check_embedded(settings: NatsSettings) -> None:
    """Refuse client credentials and TLS settings when there is no external NATS to use them with.

    The embedded server makes its own credentials; a token (or other credentials) given for it would
    otherwise be silently ignored, and the user would believe the server is protected by it.
    """
    given = [
        name
        for name, value in (
            ("token", settings.token),
            ("creds", settings.creds),
            ("user", settings.user),
            ("password", settings.password),
            ("tls_ca", settings.tls_ca),
            ("tls_cert", settings.tls_cert),
            ("tls_key", settings.tls_key),
        )
        if value
    ]
    if given:
        raise ConfigError(
            ", ".join(f"[nats] {name}" for name in given),
            "set (by a flag, an EVENTFN_NATS_* variable or eventfn.toml) without a NATS URL: it is for connecting "
            "to a NATS you run, and the embedded server would ignore it",
            "pass --nats URL to use your server; the embedded server makes its own credentials in <data dir>/auth/, "
            "and [nats.auth] or EVENTFN_NATS_ADMIN_PASSWORD and the like choose its passwords",
        )


def server_config(
    credentials: dict[str, Context],
    settings: NatsSettings,
    trigger_subjects: Sequence[str],
    resources: Sequence[str] = (),
) -> str:
    """The `authorization` block (and `no_auth_user`) of the embedded server's configuration."""
    users: list[dict[str, Any]] = []
    for role, context in credentials.items():
        users.append(
            {
                "user": context.user,
                "password": context.password,
                "permissions": _nats_permissions(permissions(role, trigger_subjects, settings.auth.publish, resources)),
            }
        )
    text = ""
    if anonymous_allowed(settings):
        # no_auth_user must name a configured user; nobody logs in as it with its password, which is not kept.
        anonymous = permissions(ANONYMOUS, trigger_subjects, settings.auth.publish, resources)
        users.append(
            {"user": ANONYMOUS, "password": secrets.token_urlsafe(24), "permissions": _nats_permissions(anonymous)}
        )
        text = f"no_auth_user: {_quote(ANONYMOUS)}\n"
    return f"authorization {_render({'users': users})}\n" + text


def _nats_permissions(p: Permissions) -> dict[str, Any]:
    out: dict[str, Any] = {"publish": {"allow": p.publish}, "subscribe": {"allow": p.subscribe}}
    if p.allow_responses:
        out["allow_responses"] = {"max": 1, "expires": REPLY_WINDOW}
    return out


def _quote(value: str) -> str:
    # nats-server's config strings know only these escapes: \\ \" \t \n \r and \xHH.
    out = value.replace("\\", "\\\\").replace('"', '\\"')
    out = "".join(f"\\x{ord(c):02x}" if ord(c) < 32 else c for c in out)
    return f'"{out}"'


def _render(value: object, indent: str = "") -> str:
    inner = indent + "  "
    if isinstance(value, dict):
        body = "".join(f"{inner}{key}: {_render(item, inner)}\n" for key, item in value.items())
        return "{\n" + body + indent + "}"
    if isinstance(value, list):
        if all(isinstance(item, str) for item in value):
            return "[" + ", ".join(_quote(item) for item in value) + "]"
        return "[\n" + "".join(f"{inner}{_render(item, inner)}\n" for item in value) + indent + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    assert isinstance(value, str)
    return _quote(value)


class EmbeddedAuth:
    """Access control of one run of the embedded server: its users block, and the service's credentials."""

    def __init__(self, config: ServiceConfig) -> None:
        check_embedded(config.nats)
        for subject in config.nats.auth.publish:
            if not valid_subject(subject) or (reserved := reserved_overlap(subject)):
                raise ConfigError(
                    "[nats.auth] publish",
                    f"{subject!r} is not a subject every role may be given"
                    + (
                        f": it overlaps {reserved!r}, which eventfn or NATS uses itself"
                        if valid_subject(subject)
                        else ""
                    ),
                    "list trigger or destination subjects, such as `audit.>`",
                )
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.credentials = load_credentials(self.data_dir, config.nats.auth) if config.nats.auth.enabled else {}

    @property
    def server_config(self) -> str:
        """The `authorization` block for the server's configuration (empty when access control is off)."""
        if not self.credentials:
            return ""
        return server_config(
            self.credentials, self.config.nats, self.config.stream.subjects, resource_streams(self.config)
        )

    def started(self, url: str) -> NatsSettings:
        """The server is up at `url`: write the credentials files, say where they are, and return the
        settings the service connects with."""
        nats = self.config.nats
        if not self.credentials:
            log.warning(
                "embedded NATS at %s runs without access control ([nats.auth] enabled = false): any client that "
                "reaches it can read every event and reply, answer for the service and purge the DLQ",
                url,
            )
            return nats
        write_credentials(self.data_dir, self.credentials, url)
        directory = auth_dir(self.data_dir)
        log.info(
            "NATS access control: credentials in %s (service, admin, invoker); the CLI uses admin.json, and so "
            "does `nats --context %s ...`; clients without credentials %s",
            directory,
            context_file(self.data_dir, ADMIN),
            "may invoke" if anonymous_allowed(nats) else "are refused",
        )
        return client_settings(msgspec.structs.replace(nats, url=[]), self.credentials[SERVICE])


# -- clients --------------------------------------------------------------------------------------------


def client_settings(base: NatsSettings, context: Context) -> NatsSettings:
    """`base` with the server and credentials of `context` (the URL only where `base` has none)."""
    return msgspec.structs.replace(
        base,
        url=base.url or [u.strip() for u in context.url.split(",") if u.strip()],
        user=context.user or None,
        password=context.password or None,
        token=context.token or None,
        creds=context.creds or None,
        tls_ca=context.ca or base.tls_ca,
        tls_cert=context.cert or base.tls_cert,
        tls_key=context.key or base.tls_key,
        inbox_prefix=context.inbox_prefix or base.inbox_prefix,
    )


def same_server(a: str, b: str) -> bool:
    """Whether two NATS URLs name the same host and port (scheme and credentials aside)."""
    pa, pb = urlsplit(_with_scheme(a)), urlsplit(_with_scheme(b))
    return (pa.hostname, pa.port or 4222) == (pb.hostname, pb.port or 4222)


def _with_scheme(url: str) -> str:
    return url if "://" in url else "nats://" + url


def redact(url: str) -> str:
    """`url` without a user or password in it (for logs and files)."""
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def admin_context(config: ServiceConfig, urls: Iterable[str]) -> Context | None:
    """The admin credentials that the embedded server wrote in the data directory, if the client is about
    to connect to that server (never sent to another one)."""
    path = context_file(config.data_dir, ADMIN)
    if not path.exists():
        return None
    context = read_context(path)
    if not context.url or not all(any(same_server(u, w) for w in context.url.split(",")) for u in urls):
        return None
    return context
