"""The queues and sharded streams declared in `eventfn.toml`, as the service provisions them and mappings read them.

A queue (SQS semantics, `queues`) and a sharded stream (Kinesis semantics, `shards`) are resources: they exist,
and take messages, whether or not a function consumes them. Functions consume them through triggers of type
`queue` and `stream`, which name them.
"""

from __future__ import annotations

import msgspec

from eventfn.broker.specs import StreamSpec
from eventfn.config import DataStreamSettings, QueueSettings, ServiceConfig, all_queues


class Resources(msgspec.Struct, frozen=True, kw_only=True):
    """Every queue (DLQ queues included) and sharded stream, and the replicas they default to."""

    queues: dict[str, QueueSettings] = {}
    streams: dict[str, DataStreamSettings] = {}
    #: Copies kept of each one that does not say (the events stream's `replicas`).
    replicas: int = 1

    @classmethod
    def of(cls, config: ServiceConfig) -> Resources:
        return cls(queues=all_queues(config), streams=dict(config.streams), replicas=config.stream.replicas)

    def specs(self) -> list[StreamSpec]:
        """The JetStream streams they need: one per queue, two per sharded stream (records, and puts not yet
        routed)."""
        from eventfn.sources import queues, shards

        out = [queues.stream_spec(name, q, self.replicas) for name, q in self.queues.items()]
        for name, s in self.streams.items():
            out += [shards.stream_spec(name, s, self.replicas), shards.ingest_spec(name, s, self.replicas)]
        return out
