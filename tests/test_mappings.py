"""Event source mappings end to end: batching, filters, partial batch responses, retries, dead letters and their
CLI, enabling and disabling, destinations, dedupe, poison input and concurrency, against a real `eventfn serve`.

Events are published as the nats CLI publishes them (a plain core publish, no headers) unless a test is about
headers. Handlers report what they saw through `_probe`; dead-letter records are watched on their subject.

The tests share one nats-server and one `eventfn serve` (a start costs about a second): each writes its own
function (its own name, its own subjects) into the shared handler directory, and `serve()` waits until the service
runs it and its mappings. The restart test runs a service of its own.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from eventfn.testing import PROBE_MODULE, NatsServer, Serve, api, wait_serving, wait_until, write_handler
from tests.conftest import Collector

pytestmark = pytest.mark.e2e

STREAM = "EVENTFN"


# -- the shared service ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """The module's nats-server: `nc` and `probe` connect to it."""
    with NatsServer(tmp_path_factory.mktemp("mappings-nats")) as server:
        yield server


@pytest.fixture(scope="module")
def handlers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared service's handler directory: each test adds its function here."""
    path = tmp_path_factory.mktemp("mappings") / "handlers"
    path.mkdir()
    (path / "_probe.py").write_text(PROBE_MODULE)
    return path


@pytest.fixture(scope="module")
def shared_service(nats_server: NatsServer, handlers: Path) -> Iterator[Serve]:
    with Serve(handlers, nats_server.url, handlers.parent / "data", env={"PROBE_NATS": nats_server.url}) as service:
        yield service


@pytest.fixture
def serve(shared_service: Serve, handlers: Path, nc: Client) -> Callable[[], Awaitable[Serve]]:
    """`await serve()`: the shared service, once it serves the latest code of every function in the handler
    directory and has provisioned each one's mappings (its async queue and every trigger)."""

    async def ready() -> Serve:
        for name in sorted(p.stem for p in handlers.glob("*.py") if not p.name.startswith("_")):
            info = await wait_serving(nc, name)
            wanted = 1 + len(info["triggers"])
            await wait_until(
                lambda: api(nc, "mappings"),
                lambda listed, name=name, wanted=wanted: (
                    sum(m["name"].startswith(f"{name}--") for m in listed) >= wanted
                ),
                what=f"{wanted} mappings of {name}",
            )
        return shared_service

    return ready


# -- helpers -----------------------------------------------------------------------------------------------------------


def handler_file(settings: str, body: str) -> str:
    """A handler module: `settings` (TOML lines) as its inline `# /// eventfn` block, then `body`."""
    block = "\n".join(f"# {line}" if line.strip() else "#" for line in settings.strip().splitlines())
    return f"# /// eventfn\n{block}\n# ///\nimport json\nimport time\n\nimport _probe\n\n{body.strip()}\n"


def add_function(handlers: Path, name: str, settings: str, body: str) -> Path:
    return write_handler(handlers, name, handler_file(textwrap.dedent(settings), textwrap.dedent(body)))


async def cli(nats_server: NatsServer, cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run `eventfn ARGS --nats URL` as a user would (without blocking the test's event loop)."""
    return await anyio.run_process(
        [sys.executable, "-m", "eventfn", *args, "--nats", nats_server.url], cwd=cwd, check=False
    )


async def cli_json(nats_server: NatsServer, cwd: Path, *args: str) -> Any:
    result = await cli(nats_server, cwd, *args, "--json")
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


async def mappings_by_name(nats_server: NatsServer, cwd: Path) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in await cli_json(nats_server, cwd, "mappings")}


async def publish_json(nc: Client, subject: str, value: Any) -> None:
    """What `nats pub SUBJECT '<json>'` sends: a core publish without headers."""
    await nc.publish(subject, json.dumps(value).encode())


def parsed(texts: list[str]) -> list[Any]:
    return [json.loads(t) for t in texts]


def attribute(value: str) -> dict[str, Any]:
    """An SQS String message attribute as a batch record holds it."""
    return {"stringValue": value, "stringListValues": [], "binaryListValues": [], "dataType": "String"}


def dlq_subject(function: str) -> str:
    return f"eventfn.dlq.{function}"


async def watch_settlements(nc: Client, consumer: str) -> Collector:
    """Collect what the service settles `consumer`'s deliveries with (`+ACK`, `-NAK ...`), as JetStream sees
    it: the settle messages published to the deliveries' `$JS.ACK...` reply subjects."""
    collector = Collector()

    async def on_message(msg: Msg) -> None:
        if consumer in msg.subject.split("."):
            await collector.on_message(msg)

    await nc.subscribe("$JS.ACK.>", cb=on_message)
    await nc.flush()
    return collector


def settled_seq(msg: Msg) -> int:
    """The stream sequence a settle message is for ($JS.ACK.<stream>.<consumer>.<n>.<sseq>..., v1 or v2)."""
    tokens = msg.subject.split(".")
    base = 2 if len(tokens) == 9 else 4
    return int(tokens[base + 3])


# -- batching ----------------------------------------------------------------------------------------------------------

BATCH_REPORTER = """
    def handler(event, context):
        _probe.report("probe.batch", json.dumps({"at": time.time(), "event": event}))
"""


async def test_batches_fill_to_batch_size_in_publish_order_and_the_window_closes_the_last(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    add_function(
        handlers,
        "batcher",
        """
        timeout = 10
        [[triggers]]
        subjects = ["events.batch.>"]
        batch_size = 10
        batch_window = 1
        """,
        BATCH_REPORTER,
    )
    await serve()
    seen = await probe("probe.batch")
    for n in range(25):
        await publish_json(nc, "events.batch.created", {"n": n})
    reports = parsed(await seen.wait_for(3))
    batches = sorted((r["event"]["Records"] for r in reports), key=lambda recs: json.loads(recs[0]["body"])["n"])
    assert [len(b) for b in batches] == [10, 10, 5]
    assert [json.loads(rec["body"])["n"] for b in batches for rec in b] == list(range(25))
    # The last, partial batch waits for its window to close; the full ones do not wait.
    assert len(reports[-1]["event"]["Records"]) == 5
    assert reports[-1]["at"] - reports[0]["at"] >= 0.9
    for n, rec in enumerate(rec for b in batches for rec in b):
        assert rec["body"] == json.dumps({"n": n})  # the published text, as text
        assert rec["subject"] == "events.batch.created"
        assert rec["attributes"]["ApproximateReceiveCount"] == "1"
        assert rec["attributes"]["SequenceNumber"].isdigit()
        assert len(rec["messageId"]) == 36
        assert rec["eventSource"] == "aws:sqs"
        assert rec["eventSourceARN"].endswith("batcher--t0")
        assert list(rec["messageAttributes"]) == ["Eventfn-Subject"]  # a plain publish has no headers
    assert len({rec["messageId"] for b in batches for rec in b}) == 25


async def test_batch_size_one_delivers_the_event_itself(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    add_function(
        handlers,
        "single",
        """
        [[triggers]]
        subjects = ["events.single.>"]
        batch_size = 1
        """,
        BATCH_REPORTER,
    )
    await serve()
    seen = await probe("probe.batch")
    await publish_json(nc, "events.single.created", {"order": 1, "items": ["a", "b"]})
    [report] = parsed(await seen.wait_for(1))
    assert report["event"] == {"order": 1, "items": ["a", "b"]}


BYTES_REPORTER = """
    def handler(event, context):
        size = len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode())
        _probe.report("probe.bytes", json.dumps({"size": size, "count": len(event["Records"])}))
"""

BYTES_SETTINGS = """
    [[triggers]]
    subjects = ["events.bytes.>"]
    batch_size = 100
    batch_window = 0.5
    max_batch_bytes = 4096
"""


async def test_batches_close_before_their_payload_passes_max_batch_bytes(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    add_function(handlers, "capped", BYTES_SETTINGS, BYTES_REPORTER)
    await serve()
    seen = await probe("probe.bytes")
    total = 12
    for n in range(total):
        await publish_json(nc, "events.bytes.created", {"n": n, "pad": "x" * 1000})  # ~1 KB each
    reports: list[dict[str, int]] = []
    while sum(r["count"] for r in reports) < total:
        reports = parsed(await seen.wait_for(len(reports) + 1))
    assert sum(r["count"] for r in reports) == total
    assert all(r["size"] < 4096 for r in reports), reports
    assert max(r["count"] for r in reports) > 1, "the cap closes batches, it does not split them to single events"
    assert len(reports) >= 4  # 12 KB of bodies cannot fit in three 4 KB batches with their envelopes


async def test_batches_of_json_bodies_with_many_strings_stay_under_max_batch_bytes(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    add_function(handlers, "capped", BYTES_SETTINGS, BYTES_REPORTER)
    await serve()
    seen = await probe("probe.bytes")
    total = 9
    for n in range(total):
        # ~1 KB of ordinary JSON: many short string fields, so many quotes to escape in the record's body.
        await publish_json(nc, "events.bytes.created", {"n": n, **{f"k{i:02}": "ab" for i in range(76)}})
    reports: list[dict[str, int]] = []
    while sum(r["count"] for r in reports) < total:
        reports = parsed(await seen.wait_for(len(reports) + 1))
    assert all(r["size"] < 4096 for r in reports), reports


# -- filters -----------------------------------------------------------------------------------------------------------


async def test_filters_pass_only_matching_events_and_count_the_rest_as_filtered(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], nats_server: NatsServer, nc: Client, probe
) -> None:
    add_function(
        handlers,
        "picky",
        """
        [[triggers]]
        subjects = ["events.picky.>"]
        filters = ['{"body": {"kind": ["keep"]}}']
        """,
        """
        def handler(event, context):
            _probe.report("probe.picky", json.dumps(event))
        """,
    )
    await serve()
    seen = await probe("probe.picky")
    settled = await watch_settlements(nc, "picky--t0")
    await publish_json(nc, "events.picky.a", {"kind": "keep", "n": 1})
    await publish_json(nc, "events.picky.a", {"kind": "drop", "n": 2})
    await nc.publish("events.picky.a", b"kind keep")  # not JSON: a body pattern cannot match it
    await nc.publish("events.picky.a", b'"keep"')  # JSON, but not an object with `kind`
    await publish_json(nc, "events.picky.a", {"n": 5})
    await publish_json(nc, "events.picky.a", {"kind": "keep", "n": 6})
    assert sorted(e["n"] for e in parsed(await seen.wait_for(2))) == [1, 6]
    assert await settled.wait_for(6) == ["+ACK"] * 6  # settled (and counted) before it is acknowledged

    mapping = (await mappings_by_name(nats_server, tmp_path))["picky--t0"]
    assert mapping["filters"] == 1
    assert mapping["stats"]["filtered"] == 4
    assert mapping["stats"]["processed"] == 2

    # Filtered events are acknowledged, not handed back: a later event is the next delivery.
    await publish_json(nc, "events.picky.b", {"kind": "keep", "n": 7})
    assert sorted(e["n"] for e in parsed(await seen.wait_for(3))) == [1, 6, 7]
    assert await settled.wait_for(7) == ["+ACK"] * 7
    assert len({settled_seq(m) for m in settled.messages}) == 7
    info = await nc.jetstream().consumer_info(STREAM, "picky--t0")
    assert info.delivered.consumer_seq == 7, "each of the 7 events was delivered exactly once"
    assert info.num_ack_pending == 0 and info.num_pending == 0
    assert (await mappings_by_name(nats_server, tmp_path))["picky--t0"]["stats"]["filtered"] == 4
    assert len(seen.messages) == 3


# -- partial batch responses -------------------------------------------------------------------------------------------


async def test_partial_batch_response_retries_only_the_reported_items_then_dead_letters_them(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    add_function(
        handlers,
        "partial",
        """
        [[triggers]]
        subjects = ["events.partial.>"]
        batch_size = 10
        batch_window = 0.5
        [retry]
        max_attempts = 1
        base_delay = 0.2
        """,
        """
        def handler(event, context):
            failures = []
            for record in event["Records"]:
                body = json.loads(record["body"])
                count = record["attributes"]["ApproximateReceiveCount"]
                seen = {"n": body["n"], "id": record["messageId"], "count": count}
                _probe.report("probe.partial", json.dumps(seen))
                if body.get("fail"):
                    failures.append({"itemIdentifier": record["messageId"]})
            return {"batchItemFailures": failures}
        """,
    )
    await serve()
    seen = await probe("probe.partial")
    dead = await probe(dlq_subject("partial"))
    settled = await watch_settlements(nc, "partial--t0")
    failing = {1, 4}
    for n in range(6):
        await publish_json(nc, "events.partial.created", {"n": n, "fail": n in failing})
    records = parsed(await dead.wait_for(2))
    reports = parsed(seen.texts)
    by_n: dict[int, list[str]] = {}
    for r in reports:
        by_n.setdefault(r["n"], []).append(r["count"])
    assert by_n == {0: ["1"], 1: ["1", "2"], 2: ["1"], 3: ["1"], 4: ["1", "2"], 5: ["1"]}

    ids = {r["n"]: r["id"] for r in reports}
    assert sorted(rec["requestPayload"]["n"] for rec in records) == [1, 4]
    for rec in records:
        n = rec["requestPayload"]["n"]
        assert rec["requestPayload"] == {"n": n, "fail": True}
        assert rec["requestContext"]["condition"] == "RetriesExhausted"
        assert rec["requestContext"]["approximateInvokeCount"] == 2
        assert rec["requestContext"]["requestId"] == ids[n]
        assert rec["responsePayload"]["errorType"] == "BatchItemFailure"

    # Per event, as JetStream saw it: the successes acknowledged once; the failures handed back with a
    # delay, then acknowledged after their dead-letter record was written.
    await settled.wait_for(8)
    outcomes: dict[int, list[str]] = {}
    for msg in settled.messages:
        outcomes.setdefault(settled_seq(msg), []).append(msg.data.decode().split(" ")[0])
    assert sorted(outcomes.values()) == sorted([["+ACK"]] * 4 + [["-NAK", "+ACK"]] * 2)


async def test_malformed_batch_response_retries_the_whole_batch(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    add_function(
        handlers,
        "malformed",
        """
        [[triggers]]
        subjects = ["events.malformed.>"]
        batch_size = 10
        batch_window = 0.5
        [retry]
        max_attempts = 1
        base_delay = 0.2
        """,
        """
        def handler(event, context):
            for record in event["Records"]:
                count = record["attributes"]["ApproximateReceiveCount"]
                _probe.report("probe.malformed", json.dumps({"n": json.loads(record["body"])["n"], "count": count}))
            return {"batchItemFailures": [{"itemIdentifier": "not-a-message-of-this-batch"}]}
        """,
    )
    await serve()
    seen = await probe("probe.malformed")
    dead = await probe(dlq_subject("malformed"))
    for n in range(3):
        await publish_json(nc, "events.malformed.created", {"n": n})
    records = parsed(await dead.wait_for(3))
    counts = sorted((r["n"], r["count"]) for r in parsed(seen.texts))
    assert counts == [(0, "1"), (0, "2"), (1, "1"), (1, "2"), (2, "1"), (2, "2")]
    assert sorted(rec["requestPayload"]["n"] for rec in records) == [0, 1, 2]
    assert {rec["responsePayload"]["errorType"] for rec in records} == {"Runtime.InvalidBatchResponse"}
    assert {rec["requestContext"]["approximateInvokeCount"] for rec in records} == {2}


# -- retries and dead letters ------------------------------------------------------------------------------------------

ALWAYS_FAILS = """
    class OutOfStock(Exception):
        pass

    def handler(event, context):
        _probe.report("probe.attempts", json.dumps({"at": time.time(), "id": context.aws_request_id}))
        raise OutOfStock("no stock for %s" % event["sku"])
"""


async def test_failed_event_is_retried_with_exponential_backoff_then_dead_lettered(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    add_function(
        handlers,
        "flaky",
        """
        triggers = ["events.flaky.>"]
        [retry]
        max_attempts = 2
        base_delay = 0.5
        max_delay = 10
        """,
        ALWAYS_FAILS,
    )
    await serve()
    attempts = await probe("probe.attempts")
    dead = await probe(dlq_subject("flaky"))
    await publish_json(nc, "events.flaky.order", {"sku": "A-1", "qty": 2})
    [record] = parsed(await dead.wait_for(1))
    tries = parsed(attempts.texts)
    assert len(tries) == 3, "the first attempt and max_attempts=2 retries"
    assert len({t["id"] for t in tries}) == 1, "the request id is stable across retries"
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(tries)]
    for gap, d in zip(gaps, [0.5, 1.0], strict=True):
        # JetStream redelivers after the nak's delay, drawn from [d/2, d]; never earlier, a little later.
        assert d / 2 - 0.05 <= gap <= d + 0.3, gaps

    context = record["requestContext"]
    assert context["condition"] == "RetriesExhausted"
    assert context["approximateInvokeCount"] == 3
    assert context["functionArn"].endswith(":function:flaky")
    assert context["requestId"] == tries[0]["id"]
    assert record["requestPayload"] == {"sku": "A-1", "qty": 2}
    assert record["responsePayload"]["errorType"] == "OutOfStock"
    assert record["responsePayload"]["errorMessage"] == "no stock for A-1"
    assert record["responseContext"]["functionError"] == "Unhandled"
    assert record["eventfn"]["subject"] == "events.flaky.order"
    assert len(dead.messages) == 1


STALE_SETTINGS = """
    triggers = ["events.stale.>"]
    [retry]
    max_attempts = 5
    base_delay = 2
    max_event_age = 1
"""


async def test_event_older_than_max_event_age_is_dead_lettered_with_event_age_exceeded(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    add_function(handlers, "stale", STALE_SETTINGS, ALWAYS_FAILS)
    await serve()
    attempts = await probe("probe.attempts")
    dead = await probe(dlq_subject("stale"))
    await publish_json(nc, "events.stale.order", {"sku": "B-2"})
    [record] = parsed(await dead.wait_for(1, timeout=10))
    assert record["requestContext"]["condition"] == "EventAgeExceeded"
    assert record["requestPayload"] == {"sku": "B-2"}
    assert record["requestContext"]["approximateInvokeCount"] <= 2, "dead-lettered by age with retries left"
    assert len(attempts.messages) <= 2


async def test_retry_of_an_event_past_max_event_age_is_not_invoked(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    add_function(handlers, "stale", STALE_SETTINGS, ALWAYS_FAILS)
    await serve()
    attempts = await probe("probe.attempts")
    dead = await probe(dlq_subject("stale"))
    await publish_json(nc, "events.stale.order", {"sku": "B-2"})
    [record] = parsed(await dead.wait_for(1, timeout=10))
    assert record["requestContext"]["condition"] == "EventAgeExceeded"
    assert len(attempts.messages) == 1, "the retry came after the event expired: dead-letter it, do not run it"


# -- the dead-letter queue CLI -----------------------------------------------------------------------------------------

BROKEN = """
    def handler(event, context):
        _probe.report("probe.broken", json.dumps(event))
        raise RuntimeError("broken on purpose")
"""

NO_RETRY = """
    [retry]
    max_attempts = 0
"""


async def test_dlq_ls_show_and_purge(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], nats_server: NatsServer, nc: Client, probe
) -> None:
    add_function(handlers, "broken", 'triggers = ["events.broken.>"]\n' + textwrap.dedent(NO_RETRY), BROKEN)
    await serve()
    dead = await probe(dlq_subject("broken"))
    await publish_json(nc, "events.broken.one", {"k": 1})
    [record] = parsed(await dead.wait_for(1))

    [summary] = await cli_json(nats_server, tmp_path, "dlq", "ls", "broken")
    assert summary["function"] == "broken"
    assert summary["condition"] == "RetriesExhausted"
    assert summary["attempts"] == 1
    assert summary["error_type"] == "RuntimeError"
    assert summary["error_message"] == "broken on purpose"
    assert summary["subject"] == "events.broken.one"
    assert await cli_json(nats_server, tmp_path, "dlq", "ls", "someone-else") == []

    shown = await cli(nats_server, tmp_path, "dlq", "show", str(summary["id"]))
    assert shown.returncode == 0, shown.stderr.decode()
    assert json.loads(shown.stdout) == record

    purged = await cli(nats_server, tmp_path, "dlq", "purge", "broken")
    assert purged.returncode == 0, purged.stderr.decode()
    assert "1 record(s) of broken purged" in purged.stdout.decode()
    assert await cli_json(nats_server, tmp_path, "dlq", "ls", "broken") == []
    table = await cli(nats_server, tmp_path, "dlq", "ls", "broken")
    assert table.stdout.decode().splitlines()[1:] == []  # the header line only


async def test_dlq_show_of_an_unknown_id_exits_1_with_a_one_line_error(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], nats_server: NatsServer
) -> None:
    add_function(handlers, "broken", 'triggers = ["events.broken.>"]\n' + textwrap.dedent(NO_RETRY), BROKEN)
    await serve()
    result = await cli(nats_server, tmp_path, "dlq", "show", "999999")
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "no DLQ record 999999" in stderr
    assert "Traceback" not in stderr
    assert result.stdout == b""


async def test_dlq_redrive_after_a_fix_processes_the_event_once_through_its_batch_mapping(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], nats_server: NatsServer, nc: Client, probe
) -> None:
    settings = """
        [[triggers]]
        subjects = ["events.fixme.>"]
        batch_size = 5
        batch_window = 0.2
        [retry]
        max_attempts = 0
    """
    add_function(
        handlers,
        "fixme",
        settings,
        """
        def handler(event, context):
            raise RuntimeError("not yet")
        """,
    )
    await serve()
    seen = await probe("probe.fixme")
    dead = await probe(dlq_subject("fixme"))
    settled = await watch_settlements(nc, "fixme--t0")
    await publish_json(nc, "events.fixme.created", {"order": 7})
    await dead.wait_for(1)

    failing = (await wait_serving(nc, "fixme"))["version"]
    add_function(
        handlers,
        "fixme",
        settings,
        """
        def handler(event, context):
            _probe.report("probe.fixme", json.dumps(event))
        """,
    )
    await wait_serving(nc, "fixme", replacing=failing)
    redriven = await cli(nats_server, tmp_path, "dlq", "redrive", "fixme")
    assert redriven.returncode == 0, redriven.stderr.decode()
    assert "1 record(s) redriven to fixme" in redriven.stdout.decode()

    [event] = parsed(await seen.wait_for(1))
    [rec] = event["Records"]
    assert rec["subject"] == "events.fixme.created"
    assert json.loads(rec["body"]) == {"order": 7}
    assert rec["eventSourceARN"].endswith("fixme--t0")
    # eventfn's redrive headers are not the user's attributes; the subject is the original one.
    assert rec["messageAttributes"] == {"Eventfn-Subject": attribute("events.fixme.created")}
    assert await cli_json(nats_server, tmp_path, "dlq", "ls", "fixme") == []

    # Processed once: a later event through the same mapping comes next, and everything is acknowledged.
    await publish_json(nc, "events.fixme.created", {"order": 8})
    second = parsed(await seen.wait_for(2))[1]
    assert [json.loads(r["body"]) for r in second["Records"]] == [{"order": 8}]
    # The original (dead-lettered, then acknowledged), the redriven copy and the later event: one ack each.
    assert await settled.wait_for(3) == ["+ACK"] * 3
    assert len({settled_seq(m) for m in settled.messages}) == 3
    assert len(dead.messages) == 1


async def test_dlq_redrive_of_a_still_failing_event_dead_letters_it_again_with_its_history(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], nats_server: NatsServer, nc: Client, probe
) -> None:
    add_function(handlers, "refailing", 'triggers = ["events.refailing.>"]\n' + textwrap.dedent(NO_RETRY), BROKEN)
    await serve()
    seen = await probe("probe.broken")
    dead = await probe(dlq_subject("refailing"))
    await publish_json(nc, "events.refailing.one", {"k": 1})
    [first] = parsed(await dead.wait_for(1))

    redriven = await cli(nats_server, tmp_path, "dlq", "redrive", "refailing")
    assert redriven.returncode == 0, redriven.stderr.decode()
    second = parsed(await dead.wait_for(2))[1]

    assert parsed(seen.texts) == [{"k": 1}, {"k": 1}]
    assert second["requestPayload"] == {"k": 1}
    assert second["eventfn"]["subject"] == "events.refailing.one"
    assert second["eventfn"]["consumer"] == "refailing--t0"
    history = second["eventfn"]["history"]
    assert len(history) == 2
    assert history[0] == first["eventfn"]["history"][0]
    assert [h["errorType"] for h in history] == ["RuntimeError", "RuntimeError"]
    [summary] = await cli_json(nats_server, tmp_path, "dlq", "ls", "refailing")
    shown = await cli(nats_server, tmp_path, "dlq", "show", str(summary["id"]))
    assert json.loads(shown.stdout) == second


# -- enabling and disabling mappings -----------------------------------------------------------------------------------

HELD = """
    [[triggers]]
    subjects = ["events.held.>"]
    name = "orders"
"""
MARKER = 'triggers = ["events.marker"]'


def reporter(subject: str) -> str:
    return f"""
        def handler(event, context):
            _probe.report("{subject}", json.dumps(event))
    """


async def test_disabled_mapping_holds_its_events_until_enabled(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], nats_server: NatsServer, nc: Client, probe
) -> None:
    add_function(handlers, "held", HELD, reporter("probe.held"))
    add_function(handlers, "marker", MARKER, reporter("probe.marker"))
    await serve()
    held, marker = await probe("probe.held"), await probe("probe.marker")
    settled = await watch_settlements(nc, "held--orders")

    disabled = await cli(nats_server, tmp_path, "mappings", "disable", "held--orders")
    assert disabled.returncode == 0, disabled.stderr.decode()
    assert disabled.stdout.decode().strip() == "held--orders: Disabled"
    for n in range(3):
        await publish_json(nc, "events.held.created", {"n": n})
    await publish_json(nc, "events.marker", {"marker": 1})
    await marker.wait_for(1, timeout=10)  # the service is alive and consuming

    mappings = await mappings_by_name(nats_server, tmp_path)
    assert mappings["held--orders"]["state"] == "Disabled"
    assert mappings["held--orders"]["lag"] == 3
    assert mappings["marker--t0"]["state"] == "Enabled"
    assert held.messages == []
    unknown = await cli(nats_server, tmp_path, "mappings", "enable", "held--t0")
    assert unknown.returncode == 1
    assert len(unknown.stderr.decode().strip().splitlines()) == 1 and b"Traceback" not in unknown.stderr
    assert b"no mapping named 'held--t0'" in unknown.stderr

    enabled = await cli(nats_server, tmp_path, "mappings", "enable", "held--orders")
    assert enabled.returncode == 0, enabled.stderr.decode()
    assert enabled.stdout.decode().strip() == "held--orders: Enabled"
    # A paused consumer's waiting pull request is not served on resume: the next one (<= 7 s) takes them.
    assert sorted(e["n"] for e in parsed(await held.wait_for(3, timeout=10))) == [0, 1, 2]
    await publish_json(nc, "events.held.created", {"n": 3})
    assert sorted(e["n"] for e in parsed(await held.wait_for(4))) == [0, 1, 2, 3]
    assert await settled.wait_for(4) == ["+ACK"] * 4
    info = await nc.jetstream().consumer_info(STREAM, "held--orders")
    assert info.delivered.consumer_seq == 4, "each held event was delivered once"
    mapping = (await mappings_by_name(nats_server, tmp_path))["held--orders"]
    assert mapping["state"] == "Enabled" and mapping["lag"] == 0


@pytest.fixture
async def own_nats(tmp_path: Path) -> AsyncIterator[tuple[NatsServer, Client]]:
    """A nats-server of the test's own (not the shared service's) and a client of it."""
    async with NatsServer(tmp_path / "nats") as server:
        client = await nats.connect(server.url)
        try:
            yield server, client
        finally:
            await client.close()


async def test_disabled_state_survives_a_service_restart(tmp_path: Path, own_nats: tuple[NatsServer, Client]) -> None:
    nats_server, nc = own_nats
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    (handlers / "_probe.py").write_text(PROBE_MODULE)
    add_function(handlers, "held", HELD, reporter("probe.held"))
    env = {"PROBE_NATS": nats_server.url}
    first = await Serve(handlers, nats_server.url, tmp_path / "data", env=env).astart()
    try:
        held = Collector()
        await nc.subscribe("probe.held", cb=held.on_message)
        await nc.flush()
        disabled = await cli(nats_server, tmp_path, "mappings", "disable", "held--orders")
        assert disabled.returncode == 0, disabled.stderr.decode()
        for n in range(2):
            await publish_json(nc, "events.held.created", {"n": n})
        assert await first.astop() == 0

        async with Serve(handlers, nats_server.url, tmp_path / "data", env=env):
            mapping = (await mappings_by_name(nats_server, tmp_path))["held--orders"]
            assert mapping["state"] == "Disabled"
            assert mapping["lag"] == 2
            enabled = await cli(nats_server, tmp_path, "mappings", "enable", "held--orders")
            assert enabled.returncode == 0, enabled.stderr.decode()
            assert sorted(e["n"] for e in parsed(await held.wait_for(2, timeout=10))) == [0, 1]
    finally:
        await first.astop()


async def test_enabled_false_in_settings_starts_the_mapping_disabled(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], nats_server: NatsServer, nc: Client, probe
) -> None:
    off = textwrap.dedent(HELD).replace("events.held.>", "events.held_off.>") + "enabled = false\n"
    add_function(handlers, "held_off", off, reporter("probe.held_off"))
    add_function(handlers, "marker", MARKER, reporter("probe.marker"))
    await serve()
    held, marker = await probe("probe.held_off"), await probe("probe.marker")
    mappings = await mappings_by_name(nats_server, tmp_path)
    assert mappings["held_off--orders"]["state"] == "Disabled"
    assert mappings["held_off--async"]["state"] == "Enabled"

    await publish_json(nc, "events.held_off.created", {"n": 0})
    await publish_json(nc, "events.marker", {"marker": 1})
    await marker.wait_for(1, timeout=10)
    assert held.messages == []
    assert (await mappings_by_name(nats_server, tmp_path))["held_off--orders"]["lag"] == 1

    enabled = await cli(nats_server, tmp_path, "mappings", "enable", "held_off--orders")
    assert enabled.returncode == 0, enabled.stderr.decode()
    assert parsed(await held.wait_for(1, timeout=10)) == [{"n": 0}]


# -- destinations, dedupe, poison input --------------------------------------------------------------------------------


async def test_destinations_receive_lambdas_success_and_failure_records(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    add_function(
        handlers,
        "dest",
        """
        triggers = ["events.dest.>"]
        [retry]
        max_attempts = 0
        [destinations]
        on_success = "dest.ok"
        on_failure = "dest.fail"
        """,
        """
        def handler(event, context):
            if event.get("fail"):
                raise ValueError("bad order %d" % event["n"])
            return {"accepted": event["n"]}
        """,
    )
    await serve()
    ok, failed = await probe("dest.ok"), await probe("dest.fail")
    await publish_json(nc, "events.dest.created", {"n": 1})
    await publish_json(nc, "events.dest.created", {"n": 2, "fail": True})
    [success] = parsed(await ok.wait_for(1))
    [failure] = parsed(await failed.wait_for(1))

    assert success["version"] == "1.0"
    assert success["requestContext"]["condition"] == "Success"
    assert success["requestContext"]["functionArn"].endswith(":function:dest")
    assert success["requestContext"]["approximateInvokeCount"] == 1
    assert success["requestPayload"] == {"n": 1}
    assert success["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}
    assert success["responsePayload"] == {"accepted": 1}

    assert failure["version"] == "1.0"
    assert failure["requestContext"]["condition"] == "RetriesExhausted"
    assert failure["requestContext"]["functionArn"].endswith(":function:dest")
    assert failure["requestContext"]["approximateInvokeCount"] == 1
    assert failure["requestPayload"] == {"n": 2, "fail": True}
    assert failure["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"}
    assert failure["responsePayload"]["errorType"] == "ValueError"
    assert failure["responsePayload"]["errorMessage"] == "bad order 2"
    assert len(ok.messages) == 1


async def test_duplicate_publishes_with_the_same_msg_id_are_processed_once(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    add_function(handlers, "dedupe", 'triggers = ["events.dedupe.>"]\nconcurrency = 1', reporter("probe.dedupe"))
    await serve()
    seen = await probe("probe.dedupe")
    js = nc.jetstream()
    first = await js.publish("events.dedupe.created", b'{"n": 1}', headers={"Nats-Msg-Id": "order-1"})
    again = await js.publish("events.dedupe.created", b'{"n": 1}', headers={"Nats-Msg-Id": "order-1"})
    assert not first.duplicate and again.duplicate and again.seq == first.seq
    await publish_json(nc, "events.dedupe.created", {"n": 2})  # one at a time: it comes after any copy
    assert parsed(await seen.wait_for(2)) == [{"n": 1}, {"n": 2}]


async def test_poison_structured_event_is_dead_lettered_and_the_mapping_keeps_processing(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    add_function(handlers, "poison", 'triggers = ["events.poison.>"]', reporter("probe.poison"))
    await serve()
    seen = await probe("probe.poison")
    dead = await probe(dlq_subject("poison"))
    await nc.publish(
        "events.poison.created", b"{this is not json", headers={"content-type": "application/cloudevents+json"}
    )
    await publish_json(nc, "events.poison.created", {"n": 1})
    [record] = parsed(await dead.wait_for(1))
    assert record["requestContext"]["condition"] == "PoisonMessage"
    assert record["requestPayload"] == "{this is not json"
    assert record["responsePayload"]["errorType"] == "EventDecodeError"
    assert record["eventfn"]["subject"] == "events.poison.created"
    assert parsed(await seen.wait_for(1)) == [{"n": 1}]
    await publish_json(nc, "events.poison.created", {"n": 2})
    assert parsed(await seen.wait_for(2)) == [{"n": 1}, {"n": 2}]
    assert len(dead.messages) == 1


# -- concurrency -------------------------------------------------------------------------------------------------------


async def test_max_concurrency_bounds_the_batches_running_at_once(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe
) -> None:
    add_function(
        handlers,
        "conc",
        """
        timeout = 10
        [[triggers]]
        subjects = ["events.conc.>"]
        batch_size = 2
        batch_window = 0.2
        max_concurrency = 2
        """,
        """
        def handler(event, context):
            start = time.time()
            time.sleep(0.4)  # long enough that batches allowed to run together visibly overlap
            ns = [json.loads(r["body"])["n"] for r in event["Records"]]
            _probe.report("probe.conc", json.dumps({"start": start, "end": time.time(), "ns": ns}))
        """,
    )
    await serve()
    seen = await probe("probe.conc")
    for n in range(10):
        await publish_json(nc, "events.conc.created", {"n": n})
    runs: list[dict[str, Any]] = []
    while sum(len(r["ns"]) for r in runs) < 10:
        runs = parsed(await seen.wait_for(len(runs) + 1))
    assert sorted(n for r in runs for n in r["ns"]) == list(range(10))
    assert all(len(r["ns"]) <= 2 for r in runs)
    edges = sorted([(r["start"], 1) for r in runs] + [(r["end"], -1) for r in runs])
    running, most = 0, 0
    for _, step in edges:
        running += step
        most = max(most, running)
    assert most == 2, runs
