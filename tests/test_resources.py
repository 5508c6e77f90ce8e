"""Queues and sharded streams as resources: how `eventfn.toml` declares them, how triggers name them, the mappings
planned for them, the NATS rights they give each role, and how replicas share out the shards."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from eventfn.broker import auth
from eventfn.config import (
    FunctionSettings,
    QueueTrigger,
    StreamTrigger,
    all_queues,
    load_service_config,
    read_function_settings,
)
from eventfn.errors import ConfigError
from eventfn.sources import mappings, shards
from eventfn.sources.memory import MemoryState
from eventfn.sources.owners import Owners, owner
from eventfn.sources.resources import Resources
from eventfn.testing import NatsServer, Serve, write_handler


def _config(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "eventfn.toml"
    path.write_text(text, encoding="utf-8")
    return load_service_config(path, {})


def test_a_queue_with_a_redrive_policy_gets_its_dlq_queue_fifo_like_it(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        "[queues.orders]\nfifo = true\nvisibility_timeout = 60\nmax_receive_count = 3\n"
        "[queues.plain]\nmax_receive_count = 0\n[streams.clicks]\nshards = 4\n",
    )
    queues = all_queues(config)
    assert sorted(queues) == ["orders", "orders-dlq", "plain"]  # `plain` has no redrive policy: no DLQ
    assert queues["orders-dlq"].fifo and queues["orders-dlq"].max_receive_count == 0
    assert config.streams["clicks"].shards == 4
    names = [spec.name for spec in Resources.of(config).specs()]
    assert names == [
        "EVENTFN_Q_orders",
        "EVENTFN_Q_plain",
        "EVENTFN_Q_orders-dlq",
        "EVENTFN_S_clicks",
        "EVENTFN_SI_clicks",
    ]
    spec = Resources.of(config).specs()[0]
    assert spec.retention == "workqueue" and spec.duplicate_window == 300.0 and spec.allow_schedules


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[queues.orders]\nvisibility = 3\n", "unknown field `visibility`"),
        ("[queues.orders]\nmax_receive_count = 1001\n", "max_receive_count"),
        ("[queues.'bad.name']\n", "[queues.bad.name]: the name is invalid"),
        ("[streams.clicks]\nshards = 0\n", "shards"),
        (
            "[queues.orders]\nfifo = true\n[queues.orders-dlq]\nfifo = false\n",
            "a queue's DLQ is FIFO exactly when the queue is",
        ),
    ],
)
def test_bad_resource_settings_are_refused_with_where_and_what(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        _config(tmp_path, text)
    assert expected in str(raised.value)
    assert "eventfn.toml" in str(raised.value)


def _settings(tmp_path: Path, triggers: str, timeout: int = 3) -> FunctionSettings:
    entry = tmp_path / "fn.py"
    entry.write_text(f"# /// eventfn\n# timeout = {timeout}\n{triggers}# ///\ndef handler(e, c): pass\n")
    return read_function_settings("fn", entry, None, {})


def _resources(tmp_path: Path) -> Resources:
    config = _config(
        tmp_path, "[queues.orders]\nvisibility_timeout = 10\n[queues.jobs]\nfifo = true\n[streams.clicks]\nshards = 3\n"
    )
    return Resources.of(config)


def test_queue_and_stream_triggers_plan_one_mapping_per_queue_and_per_shard(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        '# [[triggers]]\n# type = "queue"\n# queue = "orders"\n# maximum_concurrency = 2\n'
        '# [[triggers]]\n# type = "queue"\n# queue = "jobs"\n# batch_size = 50\n'
        '# [[triggers]]\n# type = "stream"\n# stream = "clicks"\n# name = "c"\n# parallelization_factor = 3\n',
    )
    assert [type(t) for t in settings.trigger_list()] == [QueueTrigger, QueueTrigger, StreamTrigger]
    planned = mappings.plan("fn", settings, resources=_resources(tmp_path))
    assert sorted(planned) == ["fn--async", "fn--c--shard-0", "fn--c--shard-1", "fn--c--shard-2", "fn--t0", "fn--t1"]
    orders, jobs = planned["fn--t0"], planned["fn--t1"]
    assert orders.batch_size == 10 and orders.concurrency == 2  # SQS's default batch, Lambda's MaximumConcurrency
    assert orders.ack_wait == 10.0  # the visibility timeout
    assert orders.filter_subjects == ["eventfn.queue.orders"]  # no redrive subject: it is not in the queue's stream
    assert jobs.batch_size == 10  # a FIFO queue takes at most 10
    assert jobs.source.ordering.model == "key" and jobs.source.consumer.exclusive
    shard = planned["fn--c--shard-1"]
    assert shard.batch_size == 100 and shard.concurrency == 3
    assert shard.source.subjects == ("eventfn.shard.clicks.1",) and shard.source.consumer.exclusive
    assert shard.source.shard is not None and shards.shard_id(shard.source.shard.index) == "shardId-000000000001"
    assert mappings.connector_triggers("fn", settings) == []  # eventfn's own sources, not a connector's


@pytest.mark.parametrize(
    ("triggers", "timeout", "expected"),
    [
        ('# [[triggers]]\n# type = "queue"\n# queue = "orderz"\n', 3, "queue 'orderz' is not declared"),
        ('# [[triggers]]\n# type = "stream"\n# stream = "clickz"\n', 3, "stream 'clickz' is not declared"),
        (
            '# [[triggers]]\n# type = "queue"\n# queue = "orders"\n',
            20,
            "queue visibility timeout: 10 seconds is less than function timeout: 20 seconds",
        ),
    ],
)
def test_a_trigger_on_an_undeclared_or_too_quick_queue_is_a_clear_error(
    tmp_path: Path, triggers: str, timeout: int, expected: str
) -> None:
    settings = _settings(tmp_path, triggers, timeout)
    with pytest.raises(ConfigError) as raised:
        mappings.plan("fn", settings, resources=_resources(tmp_path))
    assert expected in str(raised.value) and "function fn" in str(raised.value)


@pytest.mark.parametrize(
    ("trigger", "expected"),
    [
        ('# type = "stream"\n# stream = "s"\n# parallelization_factor = 11\n', "parallelization_factor"),
        ('# type = "stream"\n# stream = "s"\n# max_record_age = 10\n', "max_record_age is -1 or 60 to 604800"),
        ('# type = "stream"\n# stream = "s"\n# starting_position = "AT_TIMESTAMP"\n', "starting_position_timestamp"),
        ('# type = "queue"\n# queue = "q"\n# maximum_concurrency = 1\n', "maximum_concurrency"),
        ('# type = "queue"\n', "missing required field `queue`"),
    ],
)
def test_bad_queue_and_stream_trigger_options_name_the_file_and_the_key(
    tmp_path: Path, trigger: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        _settings(tmp_path, "# [[triggers]]\n" + trigger)
    assert expected in str(raised.value) and "fn.py" in str(raised.value)


def test_partition_keys_land_in_the_shard_whose_md5_hash_range_holds_them() -> None:
    ranges = shards.hash_ranges(4)
    assert ranges[0][0] == 0 and ranges[-1][1] == 2**128 - 1
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))  # contiguous, no gaps
    # MD5("a") = 0x0cc175b9...: the first quarter; MD5("b") = 0x92eb5ffe...: the third.
    assert shards.shard_of("a", 4) == 0 and shards.shard_of("b", 4) == 2
    for key in ("a", "b", "user-42", "ü"):
        index = shards.shard_of(key, 4)
        start, end = ranges[index]
        assert start <= int(hashlib.md5(key.encode()).hexdigest(), 16) <= end


def test_resource_rights_go_to_each_role_by_stream_name() -> None:
    streams = ["EVENTFN_Q_orders", "EVENTFN_S_clicks"]
    service = auth.permissions(auth.SERVICE, ["events.>"], resources=streams).publish
    admin = auth.permissions(auth.ADMIN, ["events.>"], resources=streams).publish
    invoker = auth.permissions(auth.INVOKER, ["events.>"], resources=streams).publish
    assert "$JS.API.CONSUMER.MSG.NEXT.EVENTFN_Q_orders.*" in service and "$JS.ACK.EVENTFN_S_clicks.>" in service
    assert "$JS.API.STREAM.PURGE.EVENTFN_Q_orders" in admin and "$JS.API.STREAM.PURGE.EVENTFN_Q_orders" not in service
    assert "eventfn.queue.>" in invoker and "eventfn.stream.>" in invoker
    assert not any(right.startswith("$JS.") for right in invoker)
    # Without queues or streams nobody gets their subjects.
    assert "eventfn.queue.>" not in auth.permissions(auth.INVOKER, ["events.>"]).publish


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_replicas_share_the_shards_evenly_and_take_a_dead_ones_after_the_lapse() -> None:
    state, clock = MemoryState(), _Clock()
    a = Owners(state, member="a", lapse=10.0, clock=clock, wall=clock)
    b = Owners(state, member="b", lapse=10.0, clock=clock, wall=clock)
    changes: list[str] = []
    a.on_change = lambda: changes.append("a")
    await a.beat()
    assert a.members == ("a",) and all(a.owns("fn--t0", i) for i in range(4))  # alone: every shard
    await b.beat()
    await a.beat()
    assert a.members == b.members == ("a", "b") and changes == ["a"]
    mine = [i for i in range(4) if a.owns("fn--t0", i)]
    theirs = [i for i in range(4) if b.owns("fn--t0", i)]
    assert sorted(mine + theirs) == [0, 1, 2, 3] and len(mine) == len(theirs) == 2  # each shard once, evenly
    # b dies (stops beating): a keeps it while its heartbeat is younger than the lapse, then takes its shards.
    clock.now = 9.0
    await a.beat()
    assert a.members == ("a", "b")
    clock.now = 10.5
    await a.beat()
    assert a.members == ("a",) and all(a.owns("fn--t0", i) for i in range(4)) and changes == ["a", "a"]


async def test_a_replica_killed_before_another_started_is_not_taken_for_live() -> None:
    state, clock = MemoryState(), _Clock()
    dead = Owners(state, member="dead", clock=clock, wall=clock)
    await dead.beat()
    clock.now = 60.0  # killed, never left; a new replica starts a minute later
    fresh = Owners(state, member="fresh", clock=clock, wall=clock)
    await fresh.beat()
    assert fresh.members == ("fresh",)
    # One that beat just now is live from the first sight.
    other = Owners(state, member="other", clock=clock, wall=clock)
    await other.beat()
    await fresh.beat()
    assert fresh.members == ("fresh", "other")


async def test_a_replica_that_leaves_hands_its_shards_over_at_the_next_beat() -> None:
    state = MemoryState()
    a, b = Owners(state, member="a"), Owners(state, member="b")
    await a.beat()
    await b.beat()
    await a.beat()
    assert a.members == ("a", "b")
    await b.leave()
    await a.beat()
    assert a.members == ("a",)


def test_different_mappings_start_their_shards_on_different_replicas() -> None:
    members = ("a", "b")
    firsts = {owner(f"fn{i}--t0", 0, members) for i in range(20)}
    assert firsts == {"a", "b"}


SHIP = """
    # /// eventfn
    # timeout = 2
    # [[triggers]]
    # type = "queue"
    # queue = "orders"
    # ///
    import _probe

    def handler(event, context):
        _probe.report("probe.{name}", event["Records"][0]["body"])
"""


@pytest.mark.e2e
async def test_a_second_function_on_one_queue_is_refused_by_name_and_the_first_keeps_it(
    tmp_path: Path, handlers: Path, nats_server: NatsServer, nc: Any, probe: Any
) -> None:
    (tmp_path / "eventfn.toml").write_text("[queues.orders]\nvisibility_timeout = 5\n", encoding="utf-8")
    write_handler(handlers, "alpha", SHIP.format(name="alpha"))
    write_handler(handlers, "beta", SHIP.format(name="beta"))
    alpha, beta = await probe("probe.alpha"), await probe("probe.beta")
    async with Serve(
        handlers,
        nats_server.url,
        tmp_path / "data",
        extra_args=["--config", str(tmp_path / "eventfn.toml")],
        env={"PROBE_NATS": nats_server.url},
    ) as service:
        line = await service.log.await_line(r"function beta: its triggers cannot be set up: .*")
        assert "queue 'orders' is consumed by mapping alpha--t0 already" in line.group(0)
        await nc.publish("eventfn.queue.orders", b"order 1")  # as `nats pub` sends it
        assert await alpha.wait_for(1) == ["order 1"]
    assert beta.texts == []


@pytest.mark.e2e
async def test_clients_without_credentials_may_send_to_a_queue_but_not_purge_it(tmp_path: Path, handlers: Path) -> None:
    (tmp_path / "eventfn.toml").write_text("[queues.orders]\n[streams.clicks]\n", encoding="utf-8")
    async with Serve(handlers, None, tmp_path / "data", extra_args=["--config", str(tmp_path / "eventfn.toml")]):
        url = (tmp_path / "data" / "nats.url").read_text().strip()
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        client = await nats.connect(url, error_cb=on_error)
        try:
            js = client.jetstream()
            assert (await js.publish("eventfn.queue.orders", b"order")).stream == "EVENTFN_Q_orders"
            put = await js.publish("eventfn.stream.clicks", b"click", headers={"Partition-Key": "k"})
            assert put.stream == "EVENTFN_SI_clicks"
            with pytest.raises(nats.errors.TimeoutError):  # refused by the server: JetStream never sees it
                await client.request("$JS.API.STREAM.PURGE.EVENTFN_Q_orders", b"", timeout=2)
            assert any("permissions violation for publish" in e and "purge.eventfn_q_orders" in e for e in errors)
        finally:
            await client.close()


@pytest.mark.e2e
async def test_a_renamed_queue_trigger_says_which_consumer_holds_the_queue_and_the_service_stays_up(
    tmp_path: Path, handlers: Path, nats_server: NatsServer, nc: Any, probe: Any
) -> None:
    (tmp_path / "eventfn.toml").write_text("[queues.orders]\nvisibility_timeout = 5\n", encoding="utf-8")
    write_handler(handlers, "alpha", SHIP.format(name="alpha"))
    args = ["--config", str(tmp_path / "eventfn.toml")]
    env = {"PROBE_NATS": nats_server.url}
    async with Serve(handlers, nats_server.url, tmp_path / "data", extra_args=args, env=env):
        pass  # alpha--t0 now consumes the queue, and stays after the service stops
    renamed = SHIP.format(name="alpha").replace('# type = "queue"', '# name = "renamed"\n    # type = "queue"')
    write_handler(handlers, "alpha", renamed)
    write_handler(handlers, "hello", "def handler(event, context):\n    return 'hi'\n")
    async with Serve(handlers, nats_server.url, tmp_path / "data", extra_args=args, env=env) as service:
        line = (await service.log.await_line(r"mapping alpha--renamed cannot consume queue orders: .*")).group(0)
        assert "consumer alpha--t0 already does" in line
        assert "consumer rm EVENTFN_Q_orders alpha--t0" in line
        reply = await nc.request("eventfn.invoke.hello", b"{}", timeout=10)  # the service serves on
        assert reply.data == b'"hi"'
