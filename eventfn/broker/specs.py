"""What eventfn asks of streams and consumers (`StreamSpec`, `ConsumerOptions`) and what it reads back
(`StreamHealth`, `ConsumerState`, `StoredRecord`): plain types, JetStream's JSON built from them."""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from eventfn.config import RecoverySettings
from eventfn.subjects import covers


class StoredRecord(msgspec.Struct, frozen=True):
    """A message read back from a stream."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None
    #: When it was stored (seconds since the epoch; 0 where not read).
    timestamp: float = 0.0


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
#: Seconds before an exclusive consumer whose pinned process stopped asking goes to another (`[recovery]`).
PIN_TIMEOUT = RecoverySettings().pin_timeout

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
    pin_timeout: float = PIN_TIMEOUT

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


class StreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What eventfn needs of a stream: these subjects stored, on at least so many servers, kept at least so long."""

    name: str
    subjects: list[str]
    max_age: float
    max_bytes: int = -1
    duplicate_window: float = 120.0
    replicas: int = 1
    #: "workqueue": a message is deleted once acknowledged (a queue). Fixed at creation.
    retention: Literal["limits", "workqueue"] = "limits"
    #: Messages may be scheduled for later (nats-server 2.12's `Nats-Schedule` headers: a queue's delays).
    allow_schedules: bool = False
    #: Consumers the stream may have. nats-server 2.15 caps a stream that does not say at 1,000 (and no longer
    #: takes -1 for unlimited), and every function has a consumer of its own on the events stream.
    max_consumers: int = 100_000

    def new_config(self) -> dict[str, Any]:
        """The configuration of a new stream (JetStream's JSON; durations in nanoseconds)."""
        return {
            "name": self.name,
            "subjects": self.subjects,
            "retention": self.retention,
            "storage": "file",
            "discard": "old",
            "num_replicas": self.replicas,
            "max_age": _ns(self.max_age),
            "max_bytes": self.max_bytes,
            # JetStream refuses a duplicate window longer than the stream keeps messages.
            "duplicate_window": _ns(min(self.duplicate_window, self.max_age)),
            "max_consumers": self.max_consumers,
            **({"allow_msg_schedules": True} if self.allow_schedules else {}),
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


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
