"""Settings: the service's (`eventfn.toml`, environment, flags) and each function's.

Function settings are TOML, read without executing the handler file, from (later wins, key by key):
1. an inline block in the handler file, PEP 723 style:  `# /// eventfn` ... `# ///`;
2. a sidecar file: `handlers/<name>.toml`, or `handlers/<name>/eventfn.toml` for a folder function;
3. `[functions.<name>]` in the service's `eventfn.toml`.

Config types reject unknown keys so that a typo is an error naming the key and the file.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from eventfn import plugins
from eventfn.errors import ConfigError
from eventfn.filters import compile_filters
from eventfn.subjects import overlaps, reserved_overlap

#: A function (or trigger) name is one NATS subject token, part of a JetStream consumer name
#: (`<function>--<trigger>`, hence no `--`) and one CLI argument (hence no leading `-`).
NAME_PATTERN = re.compile(r"^(?!.*--)[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_NAME_LENGTH = 64


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a function or trigger name (a phrase starting "it ..."), or None if it can.

    Valid: 1 to 64 ASCII letters, digits, `_` and `-`, starting with a letter or digit, without `--`.
    """
    if NAME_PATTERN.match(name):
        return None
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"it is {len(name)} characters long, over {MAX_NAME_LENGTH}"
    if name[0] == "-":
        return "it starts with '-', so the CLI would read it as an option"
    if name[0] == "_":
        return "it starts with '_'"
    for char in name:
        if char.isspace():
            return "it contains whitespace, which NATS subjects cannot hold"
        if char in ".*>":
            return f"it contains {char!r}, which NATS subjects use as a separator or wildcard"
        if not char.isascii():
            return f"it contains the non-ASCII character {char!r}"
        if not (char.isalnum() or char in "_-"):
            return f"it contains {char!r}"
    return "it contains `--`, which separates a function from its trigger in mapping names"


Seconds = Annotated[float, msgspec.Meta(gt=0, le=900)]


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a failed asynchronous or mapped invocation is retried (Lambda's async defaults)."""

    #: Retries after the first attempt (Lambda's MaximumRetryAttempts; its async default is 2).
    max_attempts: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 2
    #: Delay before the first retry; each later retry doubles it, up to `max_delay`, with full jitter.
    base_delay: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 1.0
    max_delay: Annotated[float, msgspec.Meta(ge=0, le=43_200)] = 300.0
    #: Events older than this are dead-lettered instead of retried (Lambda's MaximumEventAgeInSeconds).
    max_event_age: Annotated[float, msgspec.Meta(ge=1, le=604_800)] = 21_600.0


#: Lambda's synchronous payload limit: a batch closes before its encoded records pass it.
MAX_BATCH_BYTES = 6 * 1024 * 1024
#: Handler output kept per invocation by default: the size of CloudWatch's largest log event, and Cloudflare Workers'
#: per-invocation log limit. A function that logs more on purpose raises it.
MAX_LOG_BYTES = 256 * 1024


class TriggerOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What every trigger has, whatever its source: the mapping's name and Lambda's event-source-mapping settings.

    A trigger's `type` names its source: `subjects` (plain NATS subjects, the default) or a connector's type
    (`bucket`, `schedule`, ...; see `plugins`), whose trigger type extends this one with its own options.
    Names follow Lambda's CreateEventSourceMapping parameters (BatchSize, MaximumBatchingWindowInSeconds,
    FilterCriteria, Enabled, ScalingConfig.MaximumConcurrency, FunctionResponseTypes).
    """

    type: str = "subjects"
    #: The mapping's name (its durable consumer is `<function>--<name>`); default `t<index>`.
    name: str | None = None
    #: Records per invocation. With 1 the handler gets the event itself (or, for sources whose events always come
    #: as a list, such as S3's, a list of one), otherwise `{"Records": [...]}`.
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1
    #: Seconds to wait for a batch to fill; 0 invokes with whatever is already there.
    batch_window: Annotated[float, msgspec.Meta(ge=0, le=300)] = 0.0
    #: A batch also closes before its payload passes this many bytes.
    max_batch_bytes: Annotated[int, msgspec.Meta(ge=1024, le=MAX_BATCH_BYTES)] = MAX_BATCH_BYTES
    #: Up to 5 Lambda filter patterns (JSON strings or tables), OR-ed; non-matching events are acked, not run.
    filters: list[str | dict[str, Any]] = []
    #: False pauses the mapping (its events wait in JetStream); `eventfn mappings enable` resumes it.
    enabled: bool = True
    #: Batches of this mapping running at once (Lambda's MaximumConcurrency); default: the function's.
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None
    #: Honour `{"batchItemFailures": [...]}` responses (Lambda's ReportBatchItemFailures).
    report_batch_item_failures: bool = True

    def describe(self) -> list[str]:
        """How `eventfn functions` shows the trigger: its source, one line each (a connector's type says more)."""
        return [self.type]


#: Where a new mapping starts (Kinesis's names).
StartingPosition = Literal["LATEST", "TRIM_HORIZON", "AT_TIMESTAMP"]
#: What is wrong when `starting_position_timestamp` and AT_TIMESTAMP do not come together (`start_mismatch`).
START_MISMATCH = "starting_position_timestamp goes with starting_position = 'AT_TIMESTAMP', and only with it"


def start_mismatch(position: StartingPosition, timestamp: float | None) -> bool:
    """Whether a trigger's start has a timestamp without AT_TIMESTAMP, or AT_TIMESTAMP without one."""
    return (position == "AT_TIMESTAMP") != (timestamp is not None)


class Trigger(TriggerOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A trigger on plain NATS subjects of the events stream (`type = "subjects"`, the default)."""

    subjects: list[str] = []
    #: "none": any order, retries included (a retry waits in JetStream, later events overtake it). "key": events
    #: with the same `key` never run at once and never overtake each other, retries included (Lambda's rule for
    #: SQS FIFO message groups). "shard": `key` names a shard; strictly in order per shard, one batch per shard
    #: at a time, each batch from one shard (Lambda's rule for Kinesis shards).
    ordering: Literal["none", "key", "shard"] = "none"
    #: Where an event's ordering key is: `header:<Name>` or `subject:<index>` (a 0-based subject token).
    key: str | None = None
    #: Where a new mapping starts: at new events (LATEST), at the first one stored (TRIM_HORIZON), or at
    #: `starting_position_timestamp` (AT_TIMESTAMP, epoch seconds). An existing mapping resumes where it left.
    starting_position: StartingPosition = "LATEST"
    starting_position_timestamp: float | None = None

    def describe(self) -> list[str]:
        return list(self.subjects)


class QueueTrigger(TriggerOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A trigger on a queue declared in `eventfn.toml` (`type = "queue"`): Lambda's SQS event source mapping."""

    #: The queue's name (`[queues.<name>]`).
    queue: str
    #: SQS's default: 10 (a FIFO queue takes at most 10).
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10
    #: Lambda's ScalingConfig.MaximumConcurrency (2 to 1000): batches of this mapping running at once; the same as
    #: `max_concurrency`, under Lambda's name.
    maximum_concurrency: Annotated[int, msgspec.Meta(ge=2, le=1000)] | None = None

    @property
    def concurrency_cap(self) -> int | None:
        return self.maximum_concurrency or self.max_concurrency

    def describe(self) -> list[str]:
        return [f"queue {self.queue}"]


class StreamTrigger(TriggerOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A trigger on a sharded stream declared in `eventfn.toml` (`type = "stream"`): Lambda's Kinesis event source
    mapping. Each shard is consumed in order, by one `eventfn serve` at a time, with a checkpoint of its own."""

    #: The stream's name (`[streams.<name>]`).
    stream: str
    #: Kinesis's default: 100.
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    starting_position: StartingPosition = "LATEST"
    starting_position_timestamp: float | None = None
    #: Batches of one shard processed at once (1 to 10); order is kept per partition key.
    parallelization_factor: Annotated[int, msgspec.Meta(ge=1, le=10)] = 1
    #: A failed batch is split in two and each half retried (not counted as a retry), down to the bad record.
    bisect_on_error: bool = False
    #: Retries of a failed batch before it is skipped (its metadata to the DLQ); -1: until it succeeds or expires.
    max_retry_attempts: Annotated[int, msgspec.Meta(ge=-1, le=10_000)] = -1
    #: Records older than this many seconds are skipped (their batch's metadata to the DLQ); -1: never.
    max_record_age: Annotated[int, msgspec.Meta(ge=-1, le=604_800)] = -1
    #: Seconds of a tumbling window (0: none); the handler gets and returns the window's `state`.
    tumbling_window: Annotated[int, msgspec.Meta(ge=0, le=900)] = 0
    #: A literal NATS subject that also receives the failure record of a skipped batch (Lambda's OnFailure
    #: destination); the function's DLQ always does.
    on_failure: str | None = None

    def __post_init__(self) -> None:
        if 0 <= self.max_record_age < 60:
            raise ValueError(f"max_record_age is -1 or 60 to 604800 seconds, not {self.max_record_age}")
        if start_mismatch(self.starting_position, self.starting_position_timestamp):
            raise ValueError(START_MISMATCH)

    def describe(self) -> list[str]:
        return [f"stream {self.stream} from {self.starting_position}"]


class HttpTrigger(TriggerOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An HTTP route of a function (`type = "http"`): a request to `path` becomes a Lambda function URL / HTTP API
    payload v2.0 event. `mode = "sync"` answers with the function's result (a function URL); `mode = "async"`
    stores the event and answers 202 with its id (a webhook), then runs it with the function's retry and DLQ."""

    #: The route: `/orders/{id}` (a `{name}` segment is a path parameter), `/files/{path+}` (the rest of the path).
    path: str
    #: HTTP methods the route takes; empty: any.
    methods: list[str] = []
    mode: Literal["sync", "async"] = "sync"
    #: Who may call it (see `UrlSettings.auth`); None: the function's `[url] auth`.
    auth: HttpAuth | None = None
    #: The bearer token or HMAC secret; `env:NAME` reads the service's environment variable NAME (never given to
    #: the function, never logged).
    secret: str | None = None
    #: `auth = "hmac"`: the header that carries the signature, and the text before the hex digest in it.
    signature_header: str = "X-Signature-256"
    signature_prefix: str = "sha256="

    def __post_init__(self) -> None:
        if problem := route_problem(self.path):
            raise ValueError(f"path {self.path!r}: {problem}")
        for method in self.methods:
            if method.upper() not in HTTP_METHODS:
                raise ValueError(f"method {method!r} is not one of {', '.join(HTTP_METHODS)}")
        if self.auth in ("bearer", "hmac", "github", "stripe") and not self.secret:
            raise ValueError(f'auth = "{self.auth}" needs a secret (secret = "env:NAME" reads it from the service)')

    def describe(self) -> list[str]:
        methods = ",".join(m.upper() for m in self.methods) or "ANY"
        return [f"http {methods} {self.path}" + (" (async)" if self.mode == "async" else "")]


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
#: `none`: anyone; `aws_iam`: SigV4 from an access key or an execution role allowed `lambda:InvokeFunctionUrl`;
#: `bearer`: `Authorization: Bearer <secret>`; `hmac`: an HMAC-SHA256 of the body in `signature_header`;
#: `github` / `stripe`: their webhook signatures (`X-Hub-Signature-256`, `Stripe-Signature`).
HttpAuth = Literal["none", "aws_iam", "bearer", "hmac", "github", "stripe"]
_ROUTE_SEGMENT = re.compile(r"^(?:[A-Za-z0-9._~!$&'()*,;=:@-]+|\{[A-Za-z_][A-Za-z0-9_]*\+?\})$")


#: A secret setting (`[http] access_keys`, a URL's or route's `secret`) given as `env:NAME`: the variable NAME.
ENV_SECRET = "env:"


def secret_value(value: str, environ: Mapping[str, str]) -> str | None:
    """A secret setting's value: itself, or for `env:NAME` the variable NAME of `environ` (None if unset or empty)."""
    if not value.startswith(ENV_SECRET):
        return value
    return environ.get(value.removeprefix(ENV_SECRET)) or None


def route_problem(path: str) -> str | None:
    """Why `path` cannot be a route, or None."""
    if not path.startswith("/"):
        return "a route starts with /"
    parts = path.strip("/").split("/") if path != "/" else []
    for i, part in enumerate(parts):
        if not _ROUTE_SEGMENT.match(part):
            return f"segment {part!r} is not a literal or a {{name}} parameter"
        if part.endswith("+}") and i != len(parts) - 1:
            return "a {name+} parameter must be the last segment"
    if parts and parts[0] in ("fn", "2015-03-31"):
        return f"/{parts[0]}/ is eventfn's own (function URLs and the Lambda API)"
    return None


class Cors(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A function URL's CORS settings, as Lambda's `Cors` has them."""

    allow_origins: list[str] = []
    allow_methods: list[str] = []
    allow_headers: list[str] = []
    expose_headers: list[str] = []
    allow_credentials: bool = False
    max_age: Annotated[int, msgspec.Meta(ge=0, le=86_400)] = 0


class UrlSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A function's URL (`/fn/<name>/...`), Lambda's function URL config: `[url]` in its settings."""

    enabled: bool = True
    #: Who may call it. None: anyone while the HTTP server listens on loopback; beyond it the URL answers 403
    #: until its auth is declared (`"none"` to open it on purpose).
    auth: HttpAuth | None = None
    secret: str | None = None
    signature_header: str = "X-Signature-256"
    signature_prefix: str = "sha256="
    cors: Cors | None = None

    def __post_init__(self) -> None:
        if self.auth in ("bearer", "hmac", "github", "stripe") and not self.secret:
            raise ValueError(f'auth = "{self.auth}" needs a secret (secret = "env:NAME" reads it from the service)')


class Permissions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a function's execution role may do through eventfn's S3 and Lambda APIs: `[permissions]`.

    Patterns are `<bucket>/<key glob>` (`uploads/*`, `thumbs/2026/*`) and function names (globs too). By default a
    function may read the buckets its own bucket triggers name, and nothing else."""

    s3_read: list[str] = []
    s3_write: list[str] = []
    invoke: list[str] = []


class Destinations(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Subjects that receive Lambda destination records (`on_failure` in addition to the DLQ)."""

    on_success: str | None = None
    on_failure: str | None = None


class FunctionSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-function settings, with Lambda's defaults where Lambda has one."""

    description: str = ""
    #: Lambda-style `module.function` entry point; default: `handler` or `lambda_handler` in the file.
    handler: str | None = None
    timeout: Seconds = 3.0
    memory: Annotated[int, msgspec.Meta(ge=128, le=10_240)] = 128
    environment: dict[str, str] = {}
    #: Maximum parallel invocations of this function (Lambda's reserved concurrency).
    concurrency: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 10
    retry: RetryPolicy = RetryPolicy()
    #: What triggers the function: tables with a `type` (`subjects` by default, or a connector's); a string is
    #: shorthand for `{subjects = [it]}`. Each table is checked against its type's options (`trigger_list`).
    triggers: list[str | dict[str, Any]] = []
    destinations: Destinations = Destinations()
    #: "process" (default): warm worker processes. "inprocess": in the service process (see README).
    isolation: Literal["process", "inprocess"] = "process"
    #: Workers kept warm when idle (Lambda's provisioned concurrency). 0 by default, Lambda's on-demand: an idle
    #: function holds no process, and its first invocation after `idle_timeout` gets a cold start (a fork).
    min_warm: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    #: Seconds an extra worker may stay idle before it is stopped (down to `min_warm`).
    idle_timeout: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 300.0
    #: Bytes of output (print, logging, fd 1 and 2) one invocation may write to the log; the rest is dropped,
    #: with one line saying how much. The init phase has its own budget of the same size.
    max_log_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 30)] = MAX_LOG_BYTES
    #: Its function URL (`/fn/<name>/...`).
    url: UrlSettings = UrlSettings()
    #: Its execution role's policy for the S3 and Lambda APIs.
    permissions: Permissions = Permissions()

    def trigger_list(self) -> list[TriggerOptions]:
        """The triggers, each as its type's options (`Trigger` for plain subjects), the string shorthand expanded.

        Raises `ConfigError` for an unknown type or a bad option; `read_function_settings` has checked them, with
        the function and the file named.
        """
        return [_trigger(t, i, "function settings") for i, t in enumerate(self.triggers)]

    def subject_triggers(self) -> list[Trigger]:
        """The triggers on plain NATS subjects."""
        return [t for t in self.trigger_list() if isinstance(t, Trigger)]

    def http_triggers(self) -> list[HttpTrigger]:
        """The HTTP routes."""
        return [t for t in self.trigger_list() if isinstance(t, HttpTrigger)]


class AuthSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Access control of the embedded NATS server (README "Security and isolation")."""

    #: Require credentials: three users (service, admin, invoker) whose passwords are kept in `<data_dir>/auth/`.
    #: False runs the server open to any client, for anything (not advised).
    enabled: bool = True
    #: Clients without credentials may invoke (NATS `no_auth_user` with the invoker's rights), as the quickstart's
    #: plain `nats req` does. Default: only while the embedded server listens on loopback.
    anonymous: bool | None = None
    #: Your own passwords instead of generated ones (or EVENTFN_NATS_SERVICE_PASSWORD, ..._ADMIN_..., ..._INVOKER_...).
    service_password: str | None = None
    admin_password: str | None = None
    invoker_password: str | None = None
    #: Subjects beyond `[stream] subjects` that invokers, admins and the service may publish to: trigger
    #: subjects outside the stream's, destinations.
    publish: list[str] = []


class NatsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where NATS is. No `url`: start an embedded nats-server bound to loopback."""

    url: list[str] = []
    port: Annotated[int, msgspec.Meta(ge=0, le=65_535)] = 4222
    #: The address the embedded server listens on. Beyond loopback, clients without credentials are refused.
    host: str = "127.0.0.1"
    creds: str | None = None
    token: str | None = None
    user: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: The first token of this client's reply subjects, which its NATS user must be allowed to subscribe to.
    #: Default: `_INBOX_eventfn_service` for `eventfn serve`, `_INBOX_eventfn_admin` for the client commands.
    inbox_prefix: str | None = None
    #: For the client commands: a nats CLI context file (JSON with url, user, password or creds,
    #: inbox_prefix) to connect with. Default: the admin credentials the embedded server wrote.
    context: str | None = None
    auth: AuthSettings = AuthSettings()


#: JetStream keeps at most 5 copies of a stream.
Replicas = Annotated[int, msgspec.Meta(ge=1, le=5)]


class StreamSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The JetStream stream that stores events published to plain subjects."""

    #: Subjects stored for triggers; triggers outside these are added when they do not overlap them.
    subjects: list[str] = msgspec.field(default_factory=lambda: ["events.>"])
    max_age: Annotated[float, msgspec.Meta(gt=0)] = 7 * 86_400.0
    max_bytes: int = -1
    #: Servers holding a copy (JetStream R1/R3/R5). 3 on a 3-node cluster survives the loss of one; its
    #: consumers inherit it. Provisioning only raises a stream's replicas, retention and subjects (see README).
    replicas: Replicas = 1


class DlqSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The JetStream stream that stores dead-letter records."""

    max_age: Annotated[float, msgspec.Meta(gt=0)] = 14 * 86_400.0
    #: Default: the events stream's `replicas`.
    replicas: Replicas | None = None


#: A queue's or sharded stream's name: 1 to 80 ASCII letters, digits, `_` and `-` (SQS's queue names, less `.fifo`).
RESOURCE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
#: The suffix of the dead-letter queue made for a queue with a redrive policy.
DLQ_SUFFIX = "-dlq"


class QueueSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A queue (`[queues.<name>]`) with SQS's semantics, stored in a JetStream work-queue stream of its own."""

    #: Strict order per message group, and deduplication within 5 minutes.
    fifo: bool = False
    #: Seconds a received message stays hidden; extended while its handler runs. At least the timeout of every
    #: function it triggers (Lambda refuses the mapping otherwise).
    visibility_timeout: Annotated[float, msgspec.Meta(ge=1, le=43_200)] = 30.0
    #: Receives before a message moves to the queue's DLQ (`<name>-dlq`, made for it); 0: never (it is retried
    #: until `retention` ends).
    max_receive_count: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 5
    #: Seconds a message is kept (SQS: 60 s to 14 days).
    retention: Annotated[float, msgspec.Meta(ge=60, le=1_209_600)] = 345_600.0
    #: Seconds every new message stays hidden before its first receive (0 to 900).
    delay_seconds: Annotated[float, msgspec.Meta(ge=0, le=900)] = 0.0
    #: A FIFO queue deduplicates messages sent without an id by the SHA-256 of their body.
    content_based_deduplication: bool = False
    #: Servers holding a copy; default: the events stream's `replicas`.
    replicas: Replicas | None = None


class DataStreamSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A sharded stream (`[streams.<name>]`) with Kinesis's semantics, stored in a JetStream stream of its own."""

    #: Shards; a record's partition key picks one (MD5 onto the 128-bit hash range, split evenly).
    shards: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1
    #: Seconds a record is kept (Kinesis: 1 day by default, up to 365).
    retention: Annotated[float, msgspec.Meta(ge=3600, le=31_536_000)] = 86_400.0
    #: Servers holding a copy; default: the events stream's `replicas`.
    replicas: Replicas | None = None


class RecoverySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How soon work goes on after a failure: what a crashed service held, elsewhere (or in the same service,
    restarted), and an event whose DLQ write failed: `[recovery]`. Lower values take over sooner; higher ones ride
    out longer pauses (a loaded machine) without a false takeover."""

    #: Seconds an unsettled delivery waits past its function's timeout and batching window before JetStream
    #: delivers it again: what a crash left in flight comes back this much after it would have finished.
    redelivery_margin: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 10.0
    #: Seconds before JetStream gives an exclusive consumer (an ordered mapping's, a FIFO queue's, a shard's)
    #: to another service, once the one it was pinned to has stopped asking for messages.
    pin_timeout: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 10.0
    #: Seconds between the heartbeats of replicas sharing sharded streams' shards.
    heartbeat: Annotated[float, msgspec.Meta(ge=0.1, le=600)] = 2.0
    #: Seconds without a heartbeat after which the other replicas take a replica for dead and share its shards.
    lapse: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 10.0
    #: Seconds before an event whose DLQ write failed (a full or missing DLQ) is tried again; it stays queued.
    dlq_retry_delay: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 5.0
    #: Seconds before each restart of an embedded nats-server that exited, one per restart in a row; one exit more
    #: and `eventfn serve` exits 1, for its own supervisor to restart both.
    nats_restart_delays: list[float] = msgspec.field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0])

    def __post_init__(self) -> None:
        if self.lapse < 2 * self.heartbeat:
            raise ValueError(f"lapse ({self.lapse:g} s) must be at least twice heartbeat ({self.heartbeat:g} s)")
        if len(self.nats_restart_delays) > 100 or not all(0 <= d <= 600 for d in self.nats_restart_delays):
            raise ValueError("nats_restart_delays is a list of at most 100 waits of 0 to 600 seconds")


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How worker processes are separated from the service and from each other (README: Handler isolation)."""

    #: Service environment variables every worker also gets, by name; `PREFIX_*` takes all that start so.
    #: Nothing else of the service's environment reaches a handler beyond Lambda's variables and the basics.
    env_passthrough: list[str] = []
    #: Workers run as this user (name or uid) when the service runs as root. None: `nobody`, falling back to
    #: root with a warning when that user cannot run the interpreter or read the handlers.
    user: str | None = None
    #: Each worker in a user namespace of its own, where the kernel allows it.
    user_namespace: bool = True
    #: Each worker and whatever it starts in a cgroup of its own, where a cgroup v2 hierarchy is writable.
    cgroup: bool = True


class HttpSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The HTTP server: function URLs, routes and webhooks, Lambda's Invoke API, the S3 API: `[http]`."""

    enabled: bool = True
    host: str = "127.0.0.1"
    #: 0: any free port (the log and `<data_dir>/http.url` say which).
    port: Annotated[int, msgspec.Meta(ge=0, le=65_535)] = 8080
    #: Bytes of request body a function URL, route, webhook or Invoke takes (Lambda's 6 MB); more is a 413,
    #: answered before the body is read.
    max_body: Annotated[int, msgspec.Meta(ge=1024, le=1 << 30)] = 6 * 1024 * 1024
    #: Bytes of one S3 PutObject or UploadPart (S3's own cap is 5 GB); bodies are streamed to disk.
    max_object_bytes: Annotated[int, msgspec.Meta(ge=1024, le=5 << 30)] = 5 << 30
    #: Seconds a client has to send a request's head once it starts (or the first after a connection opens).
    header_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    #: Seconds without a byte while a body is being read.
    read_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    #: Seconds an idle keep-alive connection stays open.
    keepalive_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 75.0
    #: Connections at once; more are answered 503 (with Retry-After) and closed.
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000
    #: Whether the Lambda and S3 APIs require SigV4 credentials. None: only when `host` is not loopback.
    require_auth: bool | None = None
    #: Access keys the Lambda and S3 APIs accept, id -> secret (each may do anything); `env:NAME` reads a secret
    #: from the service's environment. The service also writes an admin key to `<data_dir>/auth/http.json`.
    access_keys: dict[str, str] = {}
    #: The region and account in ARNs, events and SigV4 scopes.
    region: str = "us-east-1"
    account_id: str = "000000000000"


class ServiceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole service configuration after files, environment and flags are merged."""

    handlers: str = "handlers"
    data_dir: str = ".eventfn"
    nats: NatsSettings = NatsSettings()
    stream: StreamSettings = StreamSettings()
    dlq: DlqSettings = DlqSettings()
    recovery: RecoverySettings = RecoverySettings()
    workers: WorkerSettings = WorkerSettings()
    http: HttpSettings = HttpSettings()
    functions: dict[str, dict[str, Any]] = {}
    #: Queues (SQS semantics) by name; each with a redrive policy also has its DLQ queue (`all_queues`).
    queues: dict[str, QueueSettings] = {}
    #: Sharded streams (Kinesis semantics) by name.
    streams: dict[str, DataStreamSettings] = {}
    #: Connector settings by connector type, from their tables (`[buckets]`, `[schedules]`, `[connectors.<type>]`),
    #: each checked against its connector's `Settings` by `load_service_config`.
    connectors: dict[str, dict[str, Any]] = {}
    #: Seconds a shutdown waits for in-flight invocations beyond their own timeouts.
    shutdown_grace: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    #: Invocations running at once across all functions (Lambda's account concurrency). Past it, stored events
    #: wait in JetStream and a sync invoke gets TooManyRequestsException.
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 64
    log_level: str = "INFO"


def all_queues(config: ServiceConfig) -> dict[str, QueueSettings]:
    """The queues declared, and the DLQ queue of each one with a redrive policy (`<name>-dlq`, FIFO with a FIFO
    queue, kept 14 days, without a redrive policy of its own) unless it is declared itself."""
    queues = dict(config.queues)
    for name, queue in config.queues.items():
        dlq = name + DLQ_SUFFIX
        if queue.max_receive_count and dlq not in queues:
            queues[dlq] = QueueSettings(
                fifo=queue.fifo, max_receive_count=0, retention=1_209_600.0, replicas=queue.replicas
            )
    return queues


def _check_resources(config: ServiceConfig, where: str) -> None:
    for table, names in (("queues", config.queues), ("streams", config.streams)):
        for name in names:
            if not RESOURCE_NAME.match(name):
                raise ConfigError(
                    where,
                    f"[{table}.{name}]: the name is invalid",
                    "use 1 to 80 ASCII letters, digits, `_` and `-`",
                )
    for name, queue in config.queues.items():
        dlq = config.queues.get(name + DLQ_SUFFIX)
        if queue.max_receive_count and dlq is not None and dlq.fifo != queue.fifo:
            raise ConfigError(
                where,
                f"[queues.{name}{DLQ_SUFFIX}] is {'' if dlq.fifo else 'not '}FIFO, but it is the DLQ of "
                f"[queues.{name}], which is {'' if queue.fifo else 'not '}FIFO",
                "a queue's DLQ is FIFO exactly when the queue is (SQS's rule)",
            )
        if len(name) + len(DLQ_SUFFIX) > 80 and queue.max_receive_count:
            raise ConfigError(where, f"[queues.{name}]: the name leaves no room for its DLQ's ({name}{DLQ_SUFFIX})")


def _convert(data: dict[str, Any], type_: type[Any], where: str) -> Any:
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as exc:
        raise ConfigError(where, f"invalid setting: {exc}", "see the settings reference in README.md") from exc


# tomllib ends its messages with "(at line N, column M)" or, when the problem shows only at the end of the
# text (an unclosed string, array or table; a missing value), "(at end of document)".
_TOML_POSITION = re.compile(r"\s*\((?:at line (?P<line>\d+), column (?P<column>\d+)|at end of document)\)$")


def _parse_toml(text: str, where: str, line_offset: int = 0) -> dict[str, Any]:
    """Parse TOML; an error names `where`:line, counted in the file (the text starts after `line_offset` lines)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _TOML_POSITION.search(message)
        if position is None:
            raise ConfigError(where, f"invalid TOML: {message}") from exc
        problem = message[: position.start()]
        if position.group("line"):
            line = int(position.group("line"))
            problem += f" (column {position.group('column')})"
        else:  # the last line with content, where what was opened should have been closed
            line = max(1, len(text.rstrip().splitlines()))
            problem += " (at the end of the settings)"
        raise ConfigError(f"{where}:{line + line_offset}", f"invalid TOML: {problem}") from exc


def load_service_config(path: Path | None, overrides: dict[str, Any]) -> ServiceConfig:
    """Read `eventfn.toml` (if `path` exists) and apply `overrides` (from the environment and flags).

    `path` None means the default `./eventfn.toml`, which may be absent; a path given explicitly must exist.
    """
    data: dict[str, Any] = {}
    where = str(path or "eventfn.toml")
    if path is not None and not path.exists():
        raise ConfigError(where, "file not found", "check --config / EVENTFN_CONFIG")
    source = path or Path("eventfn.toml")
    if source.exists():
        data = _parse_toml(source.read_text(encoding="utf-8"), str(source))
    nats = dict(data.get("nats", {}))
    if isinstance(nats.get("url"), str):
        nats["url"] = [u for u in nats["url"].split(",") if u]
    workers = data.get("workers", {})
    workers = dict(workers) if isinstance(workers, dict) else workers  # not a table: the validator says so
    http = data.get("http", {})
    http = dict(http) if isinstance(http, dict) else http
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("nats.auth."):
            nats["auth"] = {**nats.get("auth", {}), key.removeprefix("nats.auth."): value}
        elif key.startswith("nats."):
            nats[key.removeprefix("nats.")] = value
        elif key.startswith("workers.") and isinstance(workers, dict):
            workers[key.removeprefix("workers.")] = value
        elif key.startswith("http.") and isinstance(http, dict):
            http[key.removeprefix("http.")] = value
        else:
            data[key] = value
    data["nats"] = nats
    if workers:
        data["workers"] = workers
    if http:
        data["http"] = http
    data["connectors"] = _connector_settings(data, where)
    config: ServiceConfig = _convert(data, ServiceConfig, where)
    _check_resources(config, where)
    return config


def _connector_settings(data: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """Each connector's settings table, taken out of `data` and checked against its `Settings` type."""
    if not data.get("connectors") and all(key in ServiceConfig.__struct_fields__ for key in data):
        return {}  # no connector tables: the connectors need not be imported (a CLI command starts faster)
    nested = data.get("connectors", {})
    if not isinstance(nested, dict):
        raise ConfigError(where, "[connectors] must be a table of tables, one per connector type")
    classes = plugins.connector_classes()
    out: dict[str, dict[str, Any]] = {}
    for section, kind in plugins.settings_sections().items():
        top, _, sub = section.partition(".")
        table = nested.pop(sub, None) if top == "connectors" else data.pop(section, None)
        if table is None:
            continue
        if not isinstance(table, dict):
            raise ConfigError(where, f"[{section}] must be a table")
        try:
            msgspec.convert(table, classes[kind].Settings)
        except msgspec.ValidationError as exc:
            raise ConfigError(
                where, f"invalid setting in [{section}]: {exc}", f"see the {kind} connector's settings in its docs"
            ) from exc
        out[kind] = table
    if nested:
        unknown = ", ".join(f"[connectors.{k}]" for k in nested)
        allowed = ", ".join(f"[{s}]" for s in plugins.settings_sections()) or "none are installed"
        raise ConfigError(where, f"{unknown}: no connector of that type", f"connector settings tables: {allowed}")
    return out


def environment_overrides(environ: os._Environ[str] | dict[str, str]) -> dict[str, Any]:
    """Settings taken from `EVENTFN_*` environment variables."""
    out: dict[str, Any] = {}
    if url := environ.get("EVENTFN_NATS_URL"):
        out["nats.url"] = [u for u in url.split(",") if u]
    for key, env in (
        ("handlers", "EVENTFN_HANDLERS"),
        ("data_dir", "EVENTFN_DATA_DIR"),
        ("log_level", "EVENTFN_LOG_LEVEL"),
    ):
        if value := environ.get(env):
            out[key] = value
    for key, env in (
        ("nats.creds", "EVENTFN_NATS_CREDS"),
        ("nats.token", "EVENTFN_NATS_TOKEN"),
        ("nats.user", "EVENTFN_NATS_USER"),
        ("nats.password", "EVENTFN_NATS_PASSWORD"),
        ("nats.context", "EVENTFN_NATS_CONTEXT"),
        ("nats.auth.service_password", "EVENTFN_NATS_SERVICE_PASSWORD"),
        ("nats.auth.admin_password", "EVENTFN_NATS_ADMIN_PASSWORD"),
        ("nats.auth.invoker_password", "EVENTFN_NATS_INVOKER_PASSWORD"),
    ):
        if value := environ.get(env):
            out[key] = value
    if names := environ.get("EVENTFN_WORKER_ENV_PASSTHROUGH"):
        out["workers.env_passthrough"] = [n.strip() for n in names.split(",") if n.strip()]
    if user := environ.get("EVENTFN_WORKER_USER"):
        out["workers.user"] = user
    if port := environ.get("EVENTFN_HTTP_PORT"):
        out["http.port"] = int(port) if port.isdigit() else port
    if host := environ.get("EVENTFN_HTTP_HOST"):
        out["http.host"] = host
    if port := environ.get("EVENTFN_NATS_PORT"):
        out["nats.port"] = int(port) if port.isdigit() else port
    return out


# The regular expression of PEP 723 (inline script metadata), with the block type fixed to `eventfn`.
_INLINE_BLOCK = re.compile(r"(?m)^# /// eventfn$\s(?P<body>(^#(| .*)$\s)+)^# ///$")


def inline_settings_text(source: str, where: str = "<handler>") -> tuple[str, int] | None:
    """The TOML inside the `# /// eventfn` block of `source`, and the line number the block starts on."""
    blocks = list(_INLINE_BLOCK.finditer(source))
    if not blocks:
        return None
    if len(blocks) > 1:
        line = source.count("\n", 0, blocks[1].start()) + 1
        raise ConfigError(f"{where}:{line}", "a second `# /// eventfn` block", "merge it into the first one")
    match = blocks[0]
    lines = [line[2:] if line.startswith("# ") else line[1:] for line in match.group("body").splitlines()]
    start_line = source.count("\n", 0, match.start()) + 1
    return "\n".join(lines), start_line


def _merge(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """`layer` over `base`, key by key; tables (environment, retry) merge the same way."""
    out = dict(base)
    for key, value in layer.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_function_settings(
    name: str, entry_file: Path, sidecar: Path | None, overrides: dict[str, Any]
) -> FunctionSettings:
    """Merge a function's inline block, sidecar file and service overrides into validated settings.

    Each source is validated on its own first, so an error names the file that holds the bad key.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    try:
        source = entry_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        source = ""
    if inline := inline_settings_text(source, str(entry_file)):
        text, start = inline
        layers.append((str(entry_file), _parse_toml(text, str(entry_file), line_offset=start)))
    if sidecar is not None and sidecar.exists():
        layers.append((str(sidecar), _parse_toml(sidecar.read_text(encoding="utf-8"), str(sidecar))))
    if overrides:
        layers.append((f"eventfn.toml [functions.{name}]", overrides))
    merged: dict[str, Any] = {}
    where = str(entry_file)
    for where, layer in layers:
        checked: FunctionSettings = _convert(layer, FunctionSettings, where)
        for i, raw in enumerate(checked.triggers):  # a later layer's list replaces this one: checked here
            _trigger(raw, i, f"{where}: function {name}")
        merged = _merge(merged, layer)
    settings: FunctionSettings = _convert(merged, FunctionSettings, where)
    names: set[str] = set()
    for i, raw in enumerate(settings.triggers):
        trigger = _trigger(raw, i, f"{where}: function {name}")
        if isinstance(trigger, Trigger):
            _check_trigger(trigger, where)
        else:
            _check_name(trigger, where)
        compile_filters(trigger.filters, f"{where}: trigger {trigger.name or i}")
        trigger_name = trigger.name or f"t{i}"
        if trigger_name in names:
            raise ConfigError(where, f"two triggers are named {trigger_name!r}", "give each trigger its own name")
        names.add(trigger_name)
    for subject in (settings.destinations.on_success, settings.destinations.on_failure):
        if subject is not None and (not valid_subject(subject) or "*" in subject or ">" in subject):
            raise ConfigError(where, f"destination {subject!r} is not a literal NATS subject")
    for key in settings.environment:
        if not key or "=" in key:
            raise ConfigError(where, f"environment variable name {key!r} is invalid")
    if settings.isolation == "inprocess" and settings.environment:
        raise ConfigError(
            where,
            'environment variables need isolation = "process"',
            "an in-process function shares the service's one environment",
        )
    return settings


#: The trigger types of eventfn's own sources: plain subjects, queues and sharded streams.
BUILTIN_TRIGGERS: dict[str, type[TriggerOptions]] = {
    plugins.SUBJECTS: Trigger,
    "queue": QueueTrigger,
    "stream": StreamTrigger,
    "http": HttpTrigger,
}


def trigger_types() -> dict[str, type[TriggerOptions]]:
    """Each trigger type's options type: plain subjects (`Trigger`) and every connector's (`plugins`)."""
    found: dict[str, type[TriggerOptions]] = {}
    for kind, cls in plugins.connector_classes().items():
        if issubclass(cls.Trigger, TriggerOptions):
            found[kind] = cls.Trigger
    # The built-in sources' types are theirs, whatever a plugin calls itself.
    return {**found, **BUILTIN_TRIGGERS}


def _trigger(raw: str | dict[str, Any], index: int, where: str) -> TriggerOptions:
    """One trigger table as its type's options; a `ConfigError` names `where`, the trigger, the key and what is
    allowed."""
    if isinstance(raw, str):
        return Trigger(subjects=[raw])
    kind = raw.get("type", plugins.SUBJECTS)
    types = trigger_types()
    if not isinstance(kind, str) or kind not in types:  # a list or table is not hashable: no `in` on it
        broken = plugins.why_missing(kind) if isinstance(kind, str) else None
        raise ConfigError(
            where,
            f"triggers[{index}]: unknown trigger type {kind!r}" + (f" (its connector: {broken})" if broken else ""),
            f"type is one of: {', '.join(sorted(types))}",
        )
    options = types[kind]
    try:
        return msgspec.convert(raw, options)
    except msgspec.ValidationError as exc:
        message = str(exc).replace("`$`", f"`$.triggers[{index}]`").replace("`$.", f"`$.triggers[{index}].")
        if " - at `" not in message:
            message += f" - at `$.triggers[{index}]`"
        allowed = ", ".join(options.__struct_fields__)
        raise ConfigError(
            where, f"invalid {kind} trigger: {message}", f"a {kind} trigger's keys are: {allowed}"
        ) from exc


def _check_name(trigger: TriggerOptions, where: str) -> None:
    if trigger.name is not None and (problem := name_problem(trigger.name)):
        raise ConfigError(
            where,
            f"trigger name {trigger.name!r} is invalid: {problem}",
            "use letters, digits, `_` and `-`, starting with a letter or digit",
        )
    if trigger.name == "async":
        raise ConfigError(where, "trigger name 'async' is taken by the function's async-invoke queue")


def _check_trigger(trigger: Trigger, where: str) -> None:
    if not trigger.subjects:
        raise ConfigError(where, "a trigger needs at least one subject")
    _check_name(trigger, where)
    if trigger.ordering != "none":
        if trigger.key is None:
            raise ConfigError(
                where,
                f"ordering = {trigger.ordering!r} needs a key",
                'add key = "header:<Name>" or key = "subject:<token index>"',
            )
    if trigger.key is not None and (problem := key_problem(trigger.key)):
        raise ConfigError(
            where, f"key {trigger.key!r} is invalid: {problem}", 'use "header:<Name>" or "subject:<index>"'
        )
    if start_mismatch(trigger.starting_position, trigger.starting_position_timestamp):
        raise ConfigError(where, START_MISMATCH, "set both, or neither")
    for i, subject in enumerate(trigger.subjects):
        if not valid_subject(subject):
            raise ConfigError(
                where,
                f"trigger subject {subject!r} is not a valid NATS subject",
                "use dot-separated tokens; `*` matches one token, `>` the rest",
            )
        if reserved := reserved_overlap(subject):
            raise ConfigError(
                where,
                f"trigger subject {subject!r} overlaps {reserved!r}, which eventfn or NATS uses itself",
                "subscribe to a narrower subject, such as `events.>`",
            )
        for other in trigger.subjects[:i]:
            if overlaps(subject, other):
                raise ConfigError(
                    where, f"trigger subjects {other!r} and {subject!r} overlap", "keep only the wider one"
                )


def key_problem(key: str) -> str | None:
    """Why `key` (an ordering key's place) is not `header:<Name>` or `subject:<index>`; None if it is."""
    kind, _, where = key.partition(":")
    if kind == "header":
        if not where or any(c.isspace() or c == ":" or not c.isprintable() for c in where):
            return "a header name is printable text without spaces or `:`"
        return None
    if kind == "subject":
        if not where.isdigit() or int(where) > 255:
            return "a subject token index is a number from 0 to 255"
        return None
    return "it starts with neither `header:` nor `subject:`"


def valid_subject(subject: str) -> bool:
    """True for a NATS subject (filter): non-empty tokens, `>` only last, no whitespace."""
    if not subject or any(c.isspace() for c in subject):
        return False
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if not token or (">" in token and (token != ">" or i != len(tokens) - 1)):
            return False
        if "*" in token and token != "*":
            return False
    return True
