"""Several `eventfn serve` replicas on one NATS share a sharded stream's shards, each shard consumed by one of them at
a time; when one is killed, the survivor takes its shards over, from their checkpoints, with nothing lost and the
order per partition key kept."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client

from eventfn.testing import NatsServer, Serve, write_handler
from tests.conftest import FAST_RECOVERY, Collector

pytestmark = pytest.mark.e2e

HANDLER = """
    # /// eventfn
    # timeout = 3
    # [[triggers]]
    # type = "stream"
    # stream = "clicks"
    # starting_position = "TRIM_HORIZON"
    # batch_size = 20
    # ///
    import base64
    import os
    import _probe

    def handler(event, context):
        records = event["Records"]
        shard = records[0]["eventID"].split(":")[0]
        seen = ",".join(
            r["kinesis"]["partitionKey"] + ":" + base64.b64decode(r["kinesis"]["data"]).decode() for r in records
        )
        _probe.report("probe.clicks", os.environ["REPLICA"] + "|" + shard + "|" + seen)
"""

KEYS = 16


def _replica(tmp_path: Path, nats_server: NatsServer, handlers: Path, name: str) -> Serve:
    return Serve(
        handlers,
        nats_server.url,
        tmp_path / f"data-{name}",
        extra_args=["--config", str(tmp_path / "eventfn.toml")],
        env={
            "PROBE_NATS": nats_server.url,
            "REPLICA": name,
            "EVENTFN_WORKER_ENV_PASSTHROUGH": "PROBE_NATS,REPLICA",
        },
    )


async def _put(nc: Client, start: int, count: int) -> None:
    """Records `start` to `start + count`, round the keys, each put as `nats pub -H Partition-Key:<key>` would,
    and confirmed stored (a reply subject makes JetStream ack it)."""
    js = nc.jetstream()
    acks = [
        await js.publish_async("eventfn.stream.clicks", str(n).encode(), headers={"Partition-Key": f"k{n % KEYS}"})
        for n in range(start, start + count)
    ]
    for ack in acks:
        await ack


def _processed(collector: Collector) -> list[tuple[str, str, str, int]]:
    """(replica, shard, key, number) for every record handled, in the order each replica reported them."""
    out = []
    for text in collector.texts:
        replica, shard, seen = text.split("|")
        for item in seen.split(","):
            key, number = item.split(":")
            out.append((replica, shard, key, int(number)))
    return out


async def _wait_until(collector: Collector, done: object, timeout: float) -> None:
    with anyio.fail_after(timeout):
        while not done():  # type: ignore[operator]
            await collector.wait_for(len(collector.messages) + 1, timeout=timeout)


async def test_two_replicas_share_the_shards_and_the_survivor_takes_over_with_no_gap(
    tmp_path: Path, nats_server: NatsServer, handlers: Path, nc: Client, probe
) -> None:
    (tmp_path / "eventfn.toml").write_text("[streams.clicks]\nshards = 4\n" + FAST_RECOVERY, encoding="utf-8")
    write_handler(handlers, "clicks", HANDLER)
    seen = await probe("probe.clicks")
    a = _replica(tmp_path, nats_server, handlers, "a")
    b = _replica(tmp_path, nats_server, handlers, "b")
    try:
        await a.astart()
        await b.astart()
        # Each replica logs the change once it has seen the other's heartbeat: then the shards are spread.
        await a.log.await_line(r"replicas: 2 live", timeout=30)
        await b.log.await_line(r"replicas: 2 live", timeout=30)
        await _put(nc, 0, 400)
        await _wait_until(seen, lambda: len({n for *_, n in _processed(seen)}) >= 400, 60)
        by_replica: dict[str, set[str]] = {}
        for replica, shard, _, _ in _processed(seen):
            by_replica.setdefault(replica, set()).add(shard)
        assert set(by_replica) == {"a", "b"}, f"both replicas process shards: {by_replica}"
        assert not by_replica["a"] & by_replica["b"], f"each shard on one replica: {by_replica}"
        assert len(by_replica["a"] | by_replica["b"]) == 4

        await _put(nc, 400, 200)
        await _wait_until(seen, lambda: any(n >= 400 for *_, n in _processed(seen)), 60)
        b.kill()  # SIGKILL: its shards' batches in flight stay unacknowledged
        await _put(nc, 600, 400)
        # The survivor notices the lapsed heartbeat (4 s), waits out the pin (3 s) and the ack wait of what
        # was in flight (3 + 3 s), then goes on from each shard's checkpoint.
        await _wait_until(seen, lambda: len({n for *_, n in _processed(seen)}) >= 1000, 120)
    finally:
        await a.astop()
        await b.astop()
    processed = _processed(seen)
    assert sorted({n for *_, n in processed}) == list(range(1000)), "no record lost"
    after_kill = {shard for replica, shard, _, n in processed if n >= 600}
    assert {shard for replica, shard, _, n in processed if n >= 600 and replica == "a"} == after_kill
    assert len(after_kill) == 4, "the survivor runs all four shards"
    # Order per partition key: each record is first handled after every earlier record of its key.
    for k in range(KEYS):
        firsts = list(dict.fromkeys(n for _, _, key, n in processed if key == f"k{k}"))
        assert firsts == sorted(firsts), f"key k{k} out of order: {firsts}"
    duplicates = len(processed) - 1000
    print(f"\n{duplicates} records handled twice after the kill (the killed replica's batches in flight)")
    # The killed replica ran two shards, one batch of at most 20 in flight on each.
    assert duplicates <= 2 * 20, "replays stay within the killed replica's in-flight batches"
