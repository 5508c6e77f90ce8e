"""Provisioning only widens what other services and operators share: subjects are added, never removed; retention
and replicas only go up; settings eventfn does not own stay. Two `eventfn serve` with different handler
directories on one NATS keep each other's triggers working. Against a real nats-server."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client

from eventfn.broker.bus import Bus
from eventfn.broker.connection import connect
from eventfn.broker.specs import StreamHealth, StreamSpec
from eventfn.config import NatsSettings, load_service_config
from eventfn.errors import ConfigError
from eventfn.testing import PROBE_MODULE, NatsServer, Serve, write_handler
from tests.conftest import Collector


@pytest.fixture
async def bus(nats_server: NatsServer) -> Any:
    async with connect([nats_server.url], NatsSettings()) as connected:
        yield connected


async def stream_config(bus: Bus, name: str) -> dict[str, Any]:
    reply = await bus.nc.request(f"$JS.API.STREAM.INFO.{name}", b"", timeout=5)
    return json.loads(reply.data)["config"]  # type: ignore[no-any-return]


async def edit_stream(bus: Bus, name: str, **changes: Any) -> None:
    """What an operator's `nats stream edit` does: the stream's whole configuration sent back with changes."""
    config = {**await stream_config(bus, name), **changes}
    reply = json.loads((await bus.nc.request(f"$JS.API.STREAM.UPDATE.{name}", json.dumps(config).encode())).data)
    assert "error" not in reply, reply


@pytest.fixture
def info_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="eventfn"):
        yield caplog


# -- subjects ----------------------------------------------------------------------------------------------------------


async def test_subjects_another_process_added_stay(bus: Bus) -> None:
    await bus.ensure_stream("S", ["a.>"], max_age=60)
    await edit_stream(bus, "S", subjects=["a.>", "ops.>"])  # an operator, or another eventfn service
    assert await bus.ensure_stream("S", ["a.>", "b.>"], max_age=60) == {}
    assert (await stream_config(bus, "S"))["subjects"] == ["a.>", "ops.>", "b.>"]
    await bus.ensure_stream("S", ["a.>"], max_age=60)  # a service that needs less removes nothing
    assert (await stream_config(bus, "S"))["subjects"] == ["a.>", "ops.>", "b.>"]


async def test_a_wider_subject_replaces_narrower_ones_and_a_partial_overlap_is_refused(bus: Bus) -> None:
    await bus.ensure_stream("S", ["orders.eu.>", "orders.us.>", "x.*.created"], max_age=60)
    refused = await bus.ensure_stream("S", ["orders.>", "x.eu.>"], max_age=60)
    assert (await stream_config(bus, "S"))["subjects"] == ["x.*.created", "orders.>"]
    assert list(refused) == ["x.eu.>"]
    assert "partly overlaps 'x.*.created'" in refused["x.eu.>"]


async def test_a_stream_takes_more_consumers_than_the_servers_default_cap(bus: Bus) -> None:
    """nats-server 2.15 caps a stream that names no limit at 1,000 consumers, and eventfn has one per function: its
    streams name a cap of their own, and one an operator made with a lower cap is raised."""
    await bus.ensure_stream("S", ["a.>"], max_age=60)
    assert (await stream_config(bus, "S"))["max_consumers"] == StreamSpec(
        name="S", subjects=[], max_age=1
    ).max_consumers
    await edit_stream(bus, "S", max_consumers=5)
    await bus.ensure_stream("S", ["a.>"], max_age=60)
    assert (await stream_config(bus, "S"))["max_consumers"] == 100_000


# -- retention, replicas and what eventfn does not own -----------------------------------------------------------------


async def test_retention_only_grows_so_two_services_cannot_flip_flop(
    bus: Bus, info_log: pytest.LogCaptureFixture
) -> None:
    await bus.ensure_stream("S", ["s.>"], max_age=86_400, max_bytes=1 << 20)
    await bus.ensure_stream("S", ["s.>"], max_age=7 * 86_400, max_bytes=2 << 20)  # a second service wants more
    config = await stream_config(bus, "S")
    assert (config["max_age"], config["max_bytes"]) == (7 * 86_400 * 10**9, 2 << 20)
    await bus.ensure_stream("S", ["s.>"], max_age=86_400, max_bytes=1 << 20)  # the first one reloads
    config = await stream_config(bus, "S")
    assert (config["max_age"], config["max_bytes"]) == (7 * 86_400 * 10**9, 2 << 20)
    assert "stream S keeps max_age 604800 s (asked for 86400 s" in info_log.text
    await bus.ensure_stream("S", ["s.>"], max_age=86_400, max_bytes=-1)  # unlimited is the most
    assert (await stream_config(bus, "S"))["max_bytes"] == -1


async def test_settings_eventfn_does_not_own_survive_its_updates(bus: Bus) -> None:
    await bus.ensure_stream("S", ["s.>"], max_age=60)
    await edit_stream(
        bus, "S", description="kept by ops", compression="s2", allow_msg_ttl=True, metadata={"owner": "ops"}
    )
    await bus.ensure_stream("S", ["s.>", "t.>"], max_age=120)
    config = await stream_config(bus, "S")
    assert config["subjects"] == ["s.>", "t.>"] and config["max_age"] == 120 * 10**9
    assert (config["description"], config["compression"], config["allow_msg_ttl"]) == ("kept by ops", "s2", True)
    assert config["metadata"]["owner"] == "ops"


async def test_a_short_max_age_gets_a_duplicate_window_that_fits(bus: Bus) -> None:
    await bus.ensure_stream("S", ["s.>"], max_age=30)  # JetStream refuses a window longer than max_age
    assert (await stream_config(bus, "S"))["duplicate_window"] == 30 * 10**9


async def test_a_consumer_keeps_its_operator_metadata_and_replica_setting(bus: Bus) -> None:
    await bus.ensure_stream("S", ["s.>"], max_age=60)
    await bus.ensure_consumer("S", "c", filter_subjects=["s.>"], ack_wait=30, max_ack_pending=10, metadata={"k": "1"})
    # An operator adds metadata (`nats consumer edit`): the whole configuration sent back with the change.
    info = json.loads((await bus.nc.request("$JS.API.CONSUMER.INFO.S.c", b"", timeout=5)).data)
    config = {**info["config"], "metadata": {**info["config"]["metadata"], "team": "ops"}}
    body = json.dumps({"stream_name": "S", "config": config}).encode()
    assert "error" not in json.loads((await bus.nc.request("$JS.API.CONSUMER.CREATE.S.c", body, timeout=5)).data)
    await bus.ensure_consumer("S", "c", filter_subjects=["s.>"], ack_wait=31, max_ack_pending=10, metadata={"k": "2"})
    info = await bus.js.consumer_info("S", "c")
    assert info.config.ack_wait == 31
    assert {k: v for k, v in (info.config.metadata or {}).items() if not k.startswith("_nats")} == {
        "k": "2",
        "team": "ops",
    }
    assert not info.config.num_replicas  # as many as the stream: follows it when an operator raises it


# -- settings and errors -----------------------------------------------------------------------------------------------


def test_replicas_are_validated(tmp_path: Path) -> None:
    config = tmp_path / "eventfn.toml"
    config.write_text("[stream]\nreplicas = 3\n[dlq]\nmax_age = 60\n")
    loaded = load_service_config(config, {})
    assert (loaded.stream.replicas, loaded.dlq.replicas, loaded.dlq.max_age) == (3, None, 60)
    config.write_text("[stream]\nreplicas = 7\n")
    with pytest.raises(ConfigError, match=r"replicas"):
        load_service_config(config, {})


@pytest.mark.e2e
def test_replicas_on_a_single_server_is_a_clear_error(tmp_path: Path, nats_server: NatsServer, handlers: Path) -> None:
    config = tmp_path / "eventfn.toml"
    config.write_text("[stream]\nreplicas = 3\n")
    serve = Serve(handlers, nats_server.url, tmp_path / "data", extra_args=["--config", str(config)])
    serve.start(wait_ready=False)
    try:
        assert serve.wait(30) != 0
    finally:
        serve.stop()
    output = serve.log.text()
    assert "with 3 replicas: this NATS server is not part of a cluster" in output
    assert "set [stream] replicas = 1" in output
    assert "Traceback" not in output


# -- two services on one NATS ------------------------------------------------------------------------------------------

TRIGGERED = """
    # /// eventfn
    # triggers = ["{subject}"]
    # ///
    import _probe

    def handler(event, context):
        _probe.report("probe.{name}", str(event["n"]))
"""


def service_dir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir()
    (path / "_probe.py").write_text(PROBE_MODULE)
    return path


async def delivered(nc: Client, collector: Collector, subject: str, n: int) -> None:
    """Publish `{"n": n}` once, as the nats CLI does, and wait until its function reports it."""
    before = len(collector.messages)
    await nc.publish(subject, b'{"n": %d}' % n)
    await collector.wait_for(before + 1)
    assert collector.texts[before:] == [str(n)]


@pytest.mark.e2e
async def test_two_services_with_different_handler_dirs_keep_each_others_triggers(
    tmp_path: Path, nats_server: NatsServer, nc: Client, probe: Callable[[str], Any]
) -> None:
    first_dir, second_dir = service_dir(tmp_path, "first"), service_dir(tmp_path, "second")
    write_handler(first_dir, "orders", TRIGGERED.format(subject="orders.>", name="orders"))
    write_handler(second_dir, "billing", TRIGGERED.format(subject="billing.>", name="billing"))
    env = {"PROBE_NATS": nats_server.url}
    orders, billing, shipping = await probe("probe.orders"), await probe("probe.billing"), await probe("probe.shipping")
    js = nc.jetstream()
    first = await Serve(first_dir, nats_server.url, tmp_path / "data1", env=env).astart()
    second = Serve(second_dir, nats_server.url, tmp_path / "data2", env=env)
    try:
        await second.astart()  # "ready" comes after the consumers exist
        await delivered(nc, orders, "orders.new", 1)
        await delivered(nc, billing, "billing.new", 1)

        # The first service reloads with a new trigger: the second one's subject stays in the stream.
        write_handler(first_dir, "shipping", TRIGGERED.format(subject="shipping.>", name="shipping"))
        await first.log.await_line(r"function shipping loaded")
        with anyio.fail_after(15):
            while "shipping--t0" not in {c.name for c in await js.consumers_info("EVENTFN")}:  # noqa: ASYNC110
                await anyio.sleep(0.05)  # polling the server: nothing logs "consumer created" after a reload
        await delivered(nc, shipping, "shipping.new", 2)
        await delivered(nc, billing, "billing.new", 2)

        # The second service restarts: the first one's subjects and consumers stay, and its own resume.
        await second.astop()
        second = await Serve(second_dir, nats_server.url, tmp_path / "data2", env=env).astart()
        await delivered(nc, orders, "orders.new", 3)
        await delivered(nc, shipping, "shipping.new", 3)
        await delivered(nc, billing, "billing.new", 3)
        # And the first one restarts too, with the second one's trigger still working.
        await first.astop()
        first = await Serve(first_dir, nats_server.url, tmp_path / "data1", env=env).astart()
        await delivered(nc, billing, "billing.new", 4)
        await delivered(nc, orders, "orders.new", 4)

        assert {"orders.>", "billing.>", "shipping.>"} <= set((await js.stream_info("EVENTFN")).config.subjects or [])
    finally:
        await first.astop()
        await second.astop()


@pytest.mark.e2e
async def test_a_trigger_overlapping_another_services_subject_is_refused_alone(
    tmp_path: Path, nats_server: NatsServer, nc: Client, probe: Callable[[str], Any]
) -> None:
    first_dir, second_dir = service_dir(tmp_path, "first"), service_dir(tmp_path, "second")
    write_handler(first_dir, "created", TRIGGERED.format(subject="x.*.created", name="created"))
    write_handler(second_dir, "eu", TRIGGERED.format(subject="x.eu.>", name="eu"))  # x.eu.created is both
    write_handler(second_dir, "other", TRIGGERED.format(subject="y.>", name="other"))
    env = {"PROBE_NATS": nats_server.url}
    created, other = await probe("probe.created"), await probe("probe.other")
    first = await Serve(first_dir, nats_server.url, tmp_path / "data1", env=env).astart()
    second = Serve(second_dir, nats_server.url, tmp_path / "data2", env=env)
    try:
        await second.astart()
        await second.log.await_line(
            r"ERROR .*trigger subject 'x.eu.>' partly overlaps 'x.\*.created'.*\[stream\] subjects"
        )
        await delivered(nc, created, "x.us.created", 1)  # the first service's trigger is untouched
        await delivered(nc, other, "y.z", 1)  # and the second's other functions run
        js = nc.jetstream()
        assert "eu--t0" not in {c.name for c in await js.consumers_info("EVENTFN")}
    finally:
        await first.astop()
        await second.astop()
    assert "lacks" not in second.log.text(), "a refused subject is not something to widen again"


def test_a_refused_subject_is_not_lacking() -> None:
    spec = StreamSpec(name="S", subjects=["a.>", "x.eu.>"], max_age=60, replicas=3)
    health = StreamHealth(
        subjects=["a.>", "x.*.created"], replicas=3, max_age=60, max_bytes=-1, leader="n1", lagging=[]
    )
    assert spec.lacks(health) == ["subject 'x.eu.>'"]
    assert spec.lacks(health, refused={"x.eu.>"}) == []
    assert spec.lacks(msgspec.structs.replace(health, replicas=1, max_age=30), refused={"x.eu.>"}) == [
        "3 replicas (it has 1)",
        "max_age 60 s (it has 30 s)",
    ]
