"""NATS subject algebra (which filters overlap or cover each other) and the subjects and streams eventfn owns.

JetStream refuses a stream whose subjects overlap, and a consumer whose filters overlap; these pure functions
let eventfn build a valid set up front and name the offending trigger instead of relaying a server error.
"""

from __future__ import annotations

from collections.abc import Iterable

#: The stream of stored events: trigger subjects, async invokes, redrives.
EVENTS_STREAM = "EVENTFN"
#: The stream of dead-letter records.
DLQ_STREAM = "EVENTFN_DLQ"
#: Connector state: a JetStream KV bucket (`broker.state`), and the stream that holds it.
STATE_BUCKET = "eventfn_state"
STATE_STREAM = f"KV_{STATE_BUCKET}"

#: Sync invoke: core request/reply, never stored.
INVOKE_PREFIX = "eventfn.invoke."
#: Async invoke: stored in the events stream, processed at least once.
ASYNC_PREFIX = "eventfn.async."
#: Redriven events, one subject per mapping (`eventfn.redrive.<consumer>`), stored with the events.
REDRIVE_PREFIX = "eventfn.redrive."
#: Events connectors publish, under `eventfn.source.<connector type>.` (stored in the events stream).
SOURCE_PREFIX = "eventfn.source."
#: Queues: messages sent to `eventfn.queue.<name>`, each queue in its stream `EVENTFN_Q_<name>` (`queue_stream`).
QUEUE_PREFIX = "eventfn.queue."
QUEUE_STREAM_PREFIX = "EVENTFN_Q_"
#: Sharded streams: records put to `eventfn.stream.<name>` (the partition key in a header) or
#: `eventfn.stream.<name>.<key>` are routed to their shard's subject `eventfn.shard.<name>.<index>`, stored in
#: `EVENTFN_S_<name>`; the put subjects are held in `EVENTFN_SI_<name>` until routed.
STREAM_PREFIX = "eventfn.stream."
SHARD_PREFIX = "eventfn.shard."
DATA_STREAM_PREFIX = "EVENTFN_S_"
INGEST_STREAM_PREFIX = "EVENTFN_SI_"
#: Dead-letter records, one subject per function, in their own stream.
DLQ_PREFIX = "eventfn.dlq."
#: Requests to the running service (function list and other control operations).
API_PREFIX = "eventfn.api."
#: A function's ARN is this plus its name (Lambda's shape, with region `local` and account 0).
FUNCTION_ARN_PREFIX = "arn:aws:lambda:local:000000000000:function:"
#: Reply subjects of eventfn's NATS users, one prefix per role (see `eventfn.broker.auth`).
SERVICE_INBOX = "_INBOX_eventfn_service"
ADMIN_INBOX = "_INBOX_eventfn_admin"
INVOKER_INBOX = "_INBOX_eventfn_invoker"
#: Subjects a trigger may not touch: eventfn's own, JetStream's API, inboxes and the system account.
RESERVED = (
    "eventfn.>",
    "$JS.>",
    "$KV.>",
    "$O.>",
    "$SYS.>",
    "_INBOX.>",
    SERVICE_INBOX + ".>",
    ADMIN_INBOX + ".>",
    INVOKER_INBOX + ".>",
)


def overlaps(a: str, b: str) -> bool:
    """True if some subject matches both filters."""
    ta, tb = a.split("."), b.split(".")
    for x, y in zip(ta, tb, strict=False):
        if x == ">" or y == ">":
            return True
        if x != y and x != "*" and y != "*":
            return False
    return len(ta) == len(tb)


def covers(a: str, b: str) -> bool:
    """True if every subject matched by filter `b` is matched by filter `a`."""
    ta, tb = a.split("."), b.split(".")
    for i, y in enumerate(tb):
        if i >= len(ta):
            return False
        x = ta[i]
        if x == ">":
            return True
        if y == ">" or (x != "*" and x != y):
            return False
    return len(ta) == len(tb)


def matches(filter_: str, subject: str) -> bool:
    """True if the literal `subject` matches `filter_`."""
    return covers(filter_, subject)


def reserved_overlap(subject: str) -> str | None:
    """The reserved filter `subject` overlaps, if any."""
    return next((r for r in RESERVED if overlaps(subject, r)), None)


def stream_subjects(base: Iterable[str], triggers: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """The subjects the events stream must hold: `base` plus every trigger not already covered.

    Returns the subjects and, for triggers that cannot be added (they partly overlap another subject), the
    reason keyed by trigger subject.
    """
    subjects = list(dict.fromkeys(base))
    problems: dict[str, str] = {}
    for trigger in dict.fromkeys(triggers):
        if any(covers(s, trigger) for s in subjects):
            continue
        covered = [s for s in subjects if covers(trigger, s)]
        partial = [s for s in subjects if s not in covered and overlaps(s, trigger)]
        if partial:
            problems[trigger] = (
                f"trigger subject {trigger!r} partly overlaps {partial[0]!r}, so JetStream cannot store both; "
                f"add a subject covering both to [stream] subjects in eventfn.toml"
            )
            continue
        subjects = [s for s in subjects if s not in covered] + [trigger]
    return subjects, problems


def queue_stream(name: str) -> str:
    """The JetStream stream of queue `name`."""
    return QUEUE_STREAM_PREFIX + name


def data_stream(name: str) -> str:
    """The JetStream stream of sharded stream `name` (its records, by shard)."""
    return DATA_STREAM_PREFIX + name


def ingest_stream(name: str) -> str:
    """The JetStream stream that holds what is put to sharded stream `name` until it is routed to its shard."""
    return INGEST_STREAM_PREFIX + name
