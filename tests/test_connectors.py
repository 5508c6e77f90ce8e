"""The connector plugin API: discovery by entry point, trigger and settings validation, and a third-party
connector installed from a package of its own, run end to end by `eventfn serve` with its embedded NATS."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.abc
import msgspec
import pytest

from eventfn import plugins
from eventfn.broker.connection import connect
from eventfn.broker.state import Entry, StateStore
from eventfn.config import NatsSettings, Trigger, TriggerOptions, load_service_config, read_function_settings
from eventfn.errors import ConfigError
from eventfn.events import new_event
from eventfn.invoke.invocation import Invocation, Outcome
from eventfn.sources import hosted, mappings, records
from eventfn.sources.connector import Bound, Connector
from eventfn.sources.dispatch import Dispatcher
from eventfn.sources.mappings import Mapping
from eventfn.sources.memory import MemoryFeed, MemorySink, MemoryState
from eventfn.sources.source import Source
from eventfn.testing import NatsServer, Serve, write_handler
from tests.test_dispatch import Function as DispatchFunction
from tests.test_dispatch import event, run

EXAMPLE = Path(__file__).resolve().parent / "connector_example"


class PingTrigger(TriggerOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    type: str = "ping"
    target: str
    level: int = 1

    def __post_init__(self) -> None:
        if self.level not in (1, 2, 3):
            raise ValueError(f"level must be 1, 2 or 3, not {self.level}")


class PingSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    every: float = 1.0


class PingConnector(Connector):
    type = "ping"
    Trigger = PingTrigger
    Settings = PingSettings
    section = "pings"

    def source(self, bound: Bound) -> Source:
        return Source(kind="ping", subjects=(self.context.subject(bound.function),), max_batch_size=5)


@pytest.fixture
def ping() -> object:
    plugins.register(PingConnector)
    yield PingConnector
    plugins._registered.pop("ping", None)


def _settings(tmp_path: Path, triggers: list[object]) -> object:
    """Settings with `triggers`, read from a sidecar file as a user writes them."""
    entry = tmp_path / "fn.py"
    entry.write_text("def handler(event, context):\n    return event\n")
    tables = [
        t if isinstance(t, str) else "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in t.items()) + "}"
        for t in triggers
    ]
    sidecar = tmp_path / "fn.toml"
    sidecar.write_text("triggers = [" + ", ".join(json.dumps(t) if t[0] != "{" else t for t in tables) + "]\n")
    return read_function_settings("fn", entry, sidecar, {})


def test_a_trigger_of_a_connector_type_is_read_as_its_options(tmp_path: Path, ping: object) -> None:
    settings = _settings(tmp_path, [{"type": "ping", "target": "x", "batch_size": 20}, "events.a"])
    ping_trigger, subjects_trigger = settings.trigger_list()  # type: ignore[attr-defined]
    assert ping_trigger == PingTrigger(target="x", batch_size=20)
    assert subjects_trigger == Trigger(subjects=["events.a"])


TYPES = "type is one of: bucket, http, ping, queue, schedule, stream, subjects"


@pytest.mark.parametrize(
    ("trigger", "problem", "fix"),
    [
        ({"type": "pong"}, "unknown trigger type 'pong'", TYPES),
        # Not a string: a clear error too, not a TypeError from looking a list up in a dict.
        ({"type": ["ping"]}, "unknown trigger type ['ping']", TYPES),
        ({"type": 5}, "unknown trigger type 5", TYPES),
        ({"type": "ping"}, "missing required field `target` - at `$.triggers[0]`", "keys are: type, name"),
        ({"type": "ping", "target": "x", "tagret": 1}, "unknown field `tagret`", "target, level"),
        ({"type": "ping", "target": "x", "level": 7}, "level must be 1, 2 or 3, not 7", "target, level"),
        ({"type": "ping", "target": "x", "subjects": ["a"]}, "unknown field `subjects`", "target, level"),
    ],
)
def test_a_bad_trigger_names_the_function_the_file_the_key_and_what_is_allowed(
    tmp_path: Path, ping: object, trigger: dict[str, object], problem: str, fix: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, [trigger])
    message = str(info.value)
    assert problem in message and fix in message
    assert "function fn" in message and str(tmp_path / "fn.toml") in message


def test_connector_settings_are_read_from_their_table_and_checked(tmp_path: Path, ping: object) -> None:
    config = tmp_path / "eventfn.toml"
    config.write_text("[pings]\nevery = 2.5\n")
    assert load_service_config(config, {}).connectors["ping"] == {"every": 2.5}
    config.write_text("[pings]\nevry = 2.5\n")
    with pytest.raises(ConfigError, match=r"invalid setting in \[pings\]: Object contains unknown field `evry`"):
        load_service_config(config, {})
    config.write_text("[connectors.pong]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"\[connectors.pong\]: no connector of that type"):
        load_service_config(config, {})


def test_a_connector_trigger_plans_a_mapping_on_its_source_within_its_batch_limit(tmp_path: Path, ping: object) -> None:
    settings = _settings(tmp_path, [{"type": "ping", "target": "x", "name": "p", "batch_size": 50}])
    planned = mappings.plan(
        "fn",
        settings,  # type: ignore[arg-type]
        lambda bound: Source(kind="ping", subjects=(f"eventfn.source.ping.{bound.function}",), max_batch_size=5),
    )
    mapping = planned["fn--p"]
    assert mapping.source.kind == "ping" and mapping.batch_size == 5
    assert mapping.filter_subjects == ["eventfn.source.ping.fn", "eventfn.redrive.fn--p"]
    # Without connectors (a client that only reads settings) the trigger is left out, not an error.
    assert list(mappings.plan("fn", settings)) == ["fn--async"]  # type: ignore[arg-type]


def test_a_broken_plugin_is_refused_with_the_reason() -> None:
    class NoType(Connector):
        Trigger = PingTrigger

    with pytest.raises(TypeError, match="has no valid `type`"):
        plugins.register(NoType)

    class Lookalike(msgspec.Struct, frozen=True):  # the mapping settings' names, not TriggerOptions
        type: str = "look"
        batch_size: int = 1

    class NotOptions(PingConnector):
        type = "look"
        Trigger = Lookalike  # type: ignore[assignment]

    with pytest.raises(TypeError, match=r"has no `Trigger` options type \(a subclass of eventfn.config.TriggerOptions"):
        plugins.register(NotOptions)


# -- a third-party connector, installed from its own package -------------------------------------------------

HANDLER = """
    # /// eventfn
    # triggers = [{ type = "lines", file = "FILE", name = "log" }]
    # ///
    def handler(event, context):
        print("shipped line:", event)
        return None
"""


@pytest.mark.e2e
async def test_a_connector_from_a_separate_package_runs_end_to_end(tmp_path: Path) -> None:
    package = tmp_path / "package"
    shutil.copytree(EXAMPLE, package)
    site = tmp_path / "site"
    with anyio.fail_after(180):
        installed = await anyio.run_process(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(package)],
            check=False,
        )
    assert installed.returncode == 0, installed.stderr.decode()
    assert list(site.glob("eventfn_lines-1.0.0.dist-info/entry_points.txt"))

    log_file = tmp_path / "app.log"
    log_file.write_text("first\n")
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    write_handler(handlers, "ship", HANDLER.replace("FILE", str(log_file)))
    # The embedded server, with authentication on: the service's own rights cover what connectors do.
    service = Serve(handlers, None, tmp_path / "data", env={"PYTHONPATH": str(site)}, cwd=tmp_path)
    try:
        await service.astart()
        await service.log.await_line(r"shipped line: first$", timeout=30)
        with log_file.open("a") as file:
            file.write("second\nthird\n")
        await service.log.await_line(r"shipped line: third$", timeout=30)
        listing = await service.acli("functions", "--json")
        assert json.loads(listing.stdout)[0]["triggers"] == [f"lines of {log_file}"]
    finally:
        await service.astop()
    assert len(re.findall(r"shipped line: second$", service.log.text(), re.M)) == 1
    assert "Traceback" not in service.log.service_text()
    # The built-in connectors without triggers of theirs leave the service's directory alone (no buckets root).
    assert not (tmp_path / "buckets").exists()


# -- what a connector's source changes in dispatch --------------------------------------------------------------


class ListShape:
    """A shape whose batches are always a list, even of one (as S3's are)."""

    unwrap_single = False

    def batch(self, messages: Any, ids: Any, source_arn: str) -> bytes:
        return json.dumps(
            {"Records": [{"body": m.data.decode(), "messageId": i} for m, i in zip(messages, ids, strict=True)]}
        ).encode()


async def test_a_sources_filters_must_all_match_besides_the_mappings_own() -> None:
    source = Source(
        kind="ping",
        subjects=("eventfn.source.ping.x",),
        filters=('{"body": {"k": [{"prefix": "a"}]}}', '{"body": {"n": [{"numeric": [">", 1]}]}}'),
    )
    m = Mapping(function="fn", name="fn--t0", source=source, filters=({"body": {"n": [2, 3, 5]}},))
    feed = MemoryFeed()
    for n, k in [(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "ab"), (6, "b")]:
        feed.publish(event(n, k))
    fn = DispatchFunction()
    d = await run(m, fn, feed, lambda: len(feed.acked) == 6)
    # n > 1 and k starts with "a" (the source's, both) and n in 2, 3, 5 (the mapping's).
    assert sorted(c[0]["n"] for c in fn.calls) == [2, 5]
    assert d.stats.filtered == 4


async def test_a_shape_that_keeps_lists_gives_a_batch_of_one_at_batch_size_1() -> None:
    records.SHAPES["list-test"] = ListShape()
    try:
        source = Source(kind="ping", subjects=("eventfn.source.ping.x",), records="list-test")
        feed = MemoryFeed()
        feed.publish(event(7))
        seen: list[bytes] = []

        async def invoke(invocation: Invocation) -> Outcome:
            seen.append(invocation.payload)
            return Outcome(ok=True, payload=b"null")

        m = Mapping(function="fn", name="fn--t0", source=source)
        feed.max_inflight = m.max_inflight
        dispatcher = Dispatcher(MemorySink(), m, feed, invoke=invoke)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(dispatcher.run)
                while not feed.acked:  # noqa: ASYNC110  (the feed's settled state is what there is to watch)
                    await anyio.sleep(0.002)
                dispatcher.stop()
        [payload] = seen
        [record] = json.loads(payload)["Records"]
        assert json.loads(record["body"])["n"] == 7 and record["messageId"]
    finally:
        del records.SHAPES["list-test"]


# -- the service's connectors: supervised --------------------------------------------------------------------


class Flaky(Connector):
    """Fails its first two runs, then publishes once and stays."""

    type = "flaky"
    Trigger = PingTrigger
    runs = 0

    def source(self, bound: Bound) -> Source:
        return Source(kind="flaky", subjects=(self.context.subject("x"),))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        Flaky.runs += 1
        if Flaky.runs <= 2:
            raise RuntimeError(f"boom {Flaky.runs}")
        task_status.started()
        await self.context.publish(self.context.subject("x"), new_event("s", b"{}", source="t", id="one"))
        await anyio.sleep_forever()


class Sneaky(Flaky):
    type = "sneaky"
    refused = False

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:  # a line break in an attribute would become NATS headers of its own
            await self.context.publish(self.context.subject("x"), new_event("s", b"{}", source="t\r\nNats-Msg-Id: x"))
        except ValueError as exc:
            assert "the event's source 't\\r\\nNats-Msg-Id: x' has unprintable characters" in str(exc)
            Sneaky.refused = True
        await self.context.publish("events.elsewhere", new_event("s", b"{}", source="t"))


async def test_a_failing_connector_is_started_again_and_one_publishing_elsewhere_is_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(hosted, "RESTART_BACKOFF", (0.01, 0.02))
    published: list[tuple[str, str]] = []
    done = anyio.Event()

    async def publish(subject: str, event: Any) -> None:
        published.append((subject, event.id))
        done.set()

    host = hosted.Hosted(
        {}, publish=publish, state=lambda kind: MemoryState(), data_dir=Path("."),
        classes={"flaky": Flaky, "sneaky": Sneaky},
    )  # fmt: skip
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(host.run)
            await done.wait()
            tg.cancel_scope.cancel()
    assert published == [("eventfn.source.flaky.x", "one")]
    assert Sneaky.refused
    assert Flaky.runs == 3
    assert "connector flaky failed: RuntimeError: boom 1" in caplog.text
    assert "connector sneaky failed: ValueError: connector sneaky may only publish under eventfn.source.sneaky.>" in (
        caplog.text
    )


def test_a_connector_source_outside_its_subjects_is_refused() -> None:
    class Wide(Flaky):
        type = "wide"

        def source(self, bound: Bound) -> Source:
            return Source(kind="wide", subjects=("events.>",))

    host = hosted.Hosted({}, publish=None, state=lambda kind: MemoryState(), data_dir=Path("."), classes={"wide": Wide})  # type: ignore[arg-type]
    bound = Bound(function="fn", mapping="fn--t0", name="t0", trigger=PingTrigger(type="wide", target="x"))
    with pytest.raises(ConfigError, match=r"must take subjects under eventfn.source.wide.>"):
        host.source(bound)


class Buggy(Flaky):
    """Raises from every part of the plugin API, and claims the bucket watcher's record shape."""

    type = "buggy"
    shapes: ClassVar[dict[str, Any]] = {"s3": records.SqsShape()}

    def source(self, bound: Bound) -> Source:
        raise KeyError("oops")

    def environment(self, bound: Bound) -> dict[str, str]:
        raise RuntimeError("no environment")

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group():
            raise RuntimeError("the root is not a folder")


async def test_a_buggy_connector_is_a_clear_error_on_its_triggers_and_touches_nothing_else(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from eventfn_connectors.bucket import BucketConnector

    monkeypatch.setattr(records, "SHAPES", dict(records.SHAPES))  # what Hosted registers is undone after
    monkeypatch.setattr(hosted, "RESTART_BACKOFF", (5.0, 5.0))
    classes = {"bucket": BucketConnector, "buggy": Buggy}
    host = hosted.Hosted({}, publish=None, state=lambda kind: MemoryState(), data_dir=Path("."), classes=classes)  # type: ignore[arg-type]
    assert records.SHAPES["s3"] is BucketConnector.shapes["s3"], "another connector's record shape is kept"
    assert "connector buggy may not replace the record shape 's3'" in caplog.text
    bound = Bound(function="fn", mapping="fn--t0", name="t0", trigger=PingTrigger(type="buggy", target="x"))
    # The service plans each function's mappings and logs a ConfigError for that function alone.
    with pytest.raises(ConfigError, match=r"function fn: trigger t0: connector buggy failed: KeyError: 'oops'"):
        host.source(bound)
    assert host.environment([bound]) == {}
    assert "connector buggy: the environment of fn--t0 failed: RuntimeError: no environment" in caplog.text
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(host.run)
            tg.cancel_scope.cancel()
    # What failed, not "ExceptionGroup: unhandled errors in a TaskGroup".
    assert "connector buggy failed: RuntimeError: the root is not a folder; starting it again in 5 s" in caplog.text


# -- connector state in JetStream KV ---------------------------------------------------------------------------


async def test_connector_state_in_kv_has_revisions_compare_and_set_and_a_prefix_per_connector(
    nats_server: NatsServer,
) -> None:
    async with connect([nats_server.url], NatsSettings()) as bus:
        store = StateStore(bus)
        mine, theirs = store.of("bucket"), store.of("schedule")
        assert await mine.get("a") is None
        first = await mine.create("a", b"1")
        assert first is not None and await mine.create("a", b"2") is None
        assert await mine.update("a", b"3", first + 100) is None
        second = await mine.update("a", b"3", first)
        assert second is not None and second > first
        await mine.put("dir/b=.c", b"4")
        await theirs.put("a", b"other")
        assert {k: e.value for k, e in (await mine.items()).items()} == {"a": b"3", "dir/b=.c": b"4"}
        assert list(await mine.items("dir/")) == ["dir/b=.c"]
        await mine.delete("a")
        assert await mine.get("a") is None and list(await mine.items()) == ["dir/b=.c"]
        assert (await theirs.get("a")) == Entry(b"other", (await theirs.get("a")).revision)  # type: ignore[union-attr]
        with pytest.raises(ValueError, match="state key 'a b' is invalid"):
            await mine.put("a b", b"x")
