"""Sharded streams end to end: `eventfn serve` with `[streams.clicks]` in its eventfn.toml, records put as `nats pub`
sends them (`-H Partition-Key:<key>`), handlers written as plain Lambda Kinesis code.

The handler reports the start and the end of each invocation through `_probe`, with each record's partition key,
number and sequence number; a report is delivered before the handler goes on, so for one shard the order the test
receives them in is the order things happened. A restarted service is another life (the workers say which).
"""

from __future__ import annotations

import json
import textwrap
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.client import Client

from eventfn.sources import shards
from eventfn.testing import Serve, mapping_stats, write_handler
from tests.conftest import FAST_RECOVERY, Collector

pytestmark = pytest.mark.e2e

#: Reports each invocation's start and end; fails when a record asks to (`bad`: always; `fail`: that many
#: attempts, counted in files since a retry may run in another worker), after `WORK` seconds.
REPORTER = """
    import base64
    import json
    import os
    import time

    import _probe

    LIFE = os.environ.get("STREAM_LIFE", "1")


    def attempt(item):
        path = os.path.join(os.environ["ATTEMPTS_DIR"], "%s-%d" % (os.environ["FN"], item["n"]))
        with open(path, "a") as f:
            f.write(".")
        return os.path.getsize(path)


    def handler(event, context):
        records = event["Records"]
        items = []
        for r in records:
            item = json.loads(base64.b64decode(r["kinesis"]["data"]))
            kinesis = r["kinesis"]
            items.append({"k": kinesis["partitionKey"], "n": item["n"], "seq": int(kinesis["sequenceNumber"]),
                          "shard": r["eventID"].split(":")[0], "bad": item.get("bad", False),
                          "fail": item.get("fail", 0)})
        window = {k: event[k] for k in ("window", "state", "isFinalInvokeForWindow") if k in event}
        head = {"fn": os.environ["FN"], "life": LIFE, "id": context.aws_request_id, "window": window,
                "items": [[i["shard"], i["k"], i["n"], i["seq"]] for i in items]}
        _probe.report("probe.stream", json.dumps({"phase": "start", **head}))
        time.sleep(float(os.environ.get("WORK", "0")))
        failing = [i for i in items if i["bad"] or (i["fail"] and attempt(i) <= i["fail"])]
        _probe.report("probe.stream", json.dumps({"phase": "end", "ok": not failing, **head}))
        if failing:
            raise RuntimeError("records %s fail" % [i["n"] for i in failing])
        if window:
            total = event["state"].get("sum", 0) + sum(i["n"] for i in items)
            return {"state": {"sum": total}}
"""


def add_function(handlers: Path, name: str, trigger: str, *, timeout: float = 3, work: float = 0.0) -> None:
    settings = f"""
timeout = {timeout}

[[triggers]]
type = "stream"
stream = "clicks"
starting_position = "TRIM_HORIZON"
{textwrap.dedent(trigger).strip()}

[retry]
base_delay = 0.1

[environment]
FN = "{name}"
WORK = "{work}"
ATTEMPTS_DIR = "{handlers.parent / "attempts"}"
"""
    (handlers.parent / "attempts").mkdir(exist_ok=True)
    block = "\n".join(f"# {line}" if line else "#" for line in settings.strip().splitlines())
    write_handler(handlers, name, f"# /// eventfn\n{block}\n# ///\n{textwrap.dedent(REPORTER).lstrip()}")


class Reports:
    """What the handlers reported, and the DLQ records, in arrival order."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(m.data) for m in self.collector.messages if m.subject == "probe.stream"]

    def dead(self) -> list[dict[str, Any]]:
        return [json.loads(m.data) for m in self.collector.messages if m.subject.startswith("eventfn.dlq.")]

    def ended(self, fn: str, *, ok: bool | None = True) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["fn"] == fn and e["phase"] == "end" and (ok is None or e["ok"] == ok)]

    def done(self, fn: str) -> set[int]:
        """Numbers of the records of `fn` that succeeded."""
        return {item[2] for e in self.ended(fn) for item in e["items"]}

    async def wait_until(self, check: Callable[[], bool], timeout: float = 60.0) -> None:
        with anyio.fail_after(timeout):
            while not check():
                await self.collector.wait_for(len(self.collector.messages) + 1, timeout=timeout)


async def subscribe(nc: Client, *functions: str) -> Reports:
    collector = Collector()
    await nc.subscribe("probe.stream", cb=collector.on_message)
    for fn in functions:
        await nc.subscribe(f"eventfn.dlq.{fn}", cb=collector.on_message)
    await nc.flush()
    return Reports(collector)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "eventfn.toml"
    path.write_text("[streams.clicks]\nshards = 4\n", encoding="utf-8")
    return path


async def start(serve: Callable[..., Awaitable[Serve]], config: Path, *functions: str, life: int = 1) -> Serve:
    service = await serve(
        extra_args=["--config", str(config)],
        env={"STREAM_LIFE": str(life), "EVENTFN_WORKER_ENV_PASSTHROUGH": "PROBE_NATS,STREAM_LIFE"},
    )
    await service.log.await_line(r"eventfn ready")
    for fn in functions:
        if f"function {fn} loaded" not in service.log.text():
            problems = [line for line in service.log.lines if f"function {fn}" in line]
            pytest.fail("\n".join(problems) or f"function {fn} did not load")
    return service


async def put(nc: Client, numbers: range, key: Callable[[int], str], **extra: Any) -> None:
    """Put records as `nats pub -H Partition-Key:<key> eventfn.stream.clicks '{"n": ...}'` does, and wait until
    JetStream stored them (a plain publish is stored just the same; the flush makes it so before we go on)."""
    for n in numbers:
        body = {"n": n, **extra.get("marks", {}).get(n, {})}
        await nc.publish("eventfn.stream.clicks", json.dumps(body).encode(), headers={"Partition-Key": key(n)})
    await nc.flush()


def by_key(entries: list[dict[str, Any]]) -> dict[str, list[int]]:
    """For each key, the numbers of its records in the order invocations started with them."""
    out: dict[str, list[int]] = defaultdict(list)
    for e in entries:
        if e["phase"] == "start":
            for _, key, n, _ in e["items"]:
                out[key].append(n)
    return out


# -- order ------------------------------------------------------------------------------------------------------------


async def test_each_shard_runs_in_order_and_each_key_in_order_with_a_parallelization_factor(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, config: Path
) -> None:
    add_function(handlers, "inorder", "batch_size = 25\nbatch_window = 0.05")
    add_function(handlers, "parallel", "batch_size = 10\nbatch_window = 0.05\nparallelization_factor = 3", work=0.02)
    await start(serve, config, "inorder", "parallel")
    reports = await subscribe(nc)
    keys = [f"user-{k}" for k in range(24)]
    await put(nc, range(600), lambda n: keys[n % len(keys)])
    await reports.wait_until(lambda: len(reports.done("inorder")) == len(reports.done("parallel")) == 600)
    for fn in ("inorder", "parallel"):
        starts = [e for e in reports.entries if e["fn"] == fn and e["phase"] == "start"]
        assert all(len({item[0] for item in e["items"]}) == 1 for e in starts), "a batch holds one shard"
        assert sum(len(e["items"]) for e in starts) == 600, "each record once (none failed)"
        for key, numbers in by_key(starts).items():
            assert numbers == sorted(numbers), f"{fn}: key {key} out of order"
            shard = shards.shard_id(shards.shard_of(key, 4))
            assert {item[0] for e in starts for item in e["items"] if item[1] == key} == {shard}, "the key's shard"
    # One lane per shard: the shard's records in sequence order, batch after batch.
    per_shard: dict[str, list[int]] = defaultdict(list)
    for e in reports.entries:
        if e["fn"] == "inorder" and e["phase"] == "start":
            per_shard[e["items"][0][0]] += [item[3] for item in e["items"]]
    assert len(per_shard) == 4
    for shard, seqs in per_shard.items():
        assert seqs == sorted(seqs), f"{shard} out of order"
    # Three lanes per shard: batches of one shard overlap (a batch starts before the last one ended).
    running: dict[str, int] = defaultdict(int)
    overlapped = False
    for e in reports.entries:
        if e["fn"] == "parallel":
            shard = e["items"][0][0]
            running[shard] += 1 if e["phase"] == "start" else -1
            overlapped = overlapped or running[shard] > 1
    assert overlapped, "lanes of one shard run side by side"


# -- bisect and the DLQ -------------------------------------------------------------------------------------------


async def test_bisecting_isolates_the_bad_record_and_its_batch_info_goes_to_the_dlq(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, config: Path
) -> None:
    add_function(
        handlers, "bisect", "batch_size = 16\nbatch_window = 1\nbisect_on_error = true\nmax_retry_attempts = 1"
    )
    service = await start(serve, config, "bisect")
    reports = await subscribe(nc, "bisect")
    await put(nc, range(16), lambda n: "one-key", marks={11: {"bad": True}})
    await reports.wait_until(lambda: len(reports.done("bisect")) == 15 and len(reports.dead()) == 1)
    succeeded = [item[2] for e in reports.ended("bisect") for item in e["items"]]
    assert sorted(succeeded) == [n for n in range(16) if n != 11], "each good record once, in a successful batch"
    failed = [[item[2] for item in e["items"]] for e in reports.ended("bisect", ok=False)]
    assert failed[0] == list(range(16)) and [11] in failed, f"halves down to the bad record: {failed}"
    [record] = reports.dead()
    info = record["KinesisBatchInfo"]
    assert info["batchSize"] == 1 and info["startSequenceNumber"] == info["endSequenceNumber"]
    assert record["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert info["streamArn"] == "arn:aws:kinesis:local:000000000000:stream/clicks"

    listed = await service.acli("dlq", "ls", "bisect", "--json")
    assert listed.returncode == 0, listed.stderr
    [summary] = json.loads(listed.stdout)
    assert summary["condition"] == "RetryAttemptsExhausted"
    assert summary["error_type"] == "RuntimeError"
    assert summary["subject"].startswith(info["shardId"])
    shown = await service.acli("dlq", "show", str(summary["id"]))
    assert json.loads(shown.stdout)["KinesisBatchInfo"] == info
    redrive = await service.acli("dlq", "redrive", "bisect")
    assert redrive.returncode == 1
    assert "holds the metadata of a failed stream batch" in redrive.stderr
    assert "Traceback" not in redrive.stderr


# -- a crash ----------------------------------------------------------------------------------------------------------


async def test_after_a_sigkill_each_shard_resumes_at_its_checkpoint_with_no_gap_and_no_replay_beyond_in_flight(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, config: Path
) -> None:
    add_function(handlers, "crash", "batch_size = 10\nbatch_window = 0.05", timeout=1, work=0.05)
    config.write_text(config.read_text(encoding="utf-8") + FAST_RECOVERY, encoding="utf-8")
    first = await start(serve, config, "crash", life=1)
    reports = await subscribe(nc)
    keys = [f"user-{k}" for k in range(16)]
    await put(nc, range(400), lambda n: keys[n % len(keys)])
    await reports.wait_until(lambda: len(reports.done("crash")) >= 80)
    first.kill()
    assert len(reports.done("crash")) < 400, "the kill must come mid-stream"
    await start(serve, config, "crash", life=2)
    await reports.wait_until(lambda: len(reports.done("crash")) == 400, timeout=90)
    # Read once every report is in: a worker of the killed service may still report a moment after the kill.
    # A shard's next batch starts once the last one is checkpointed: the last batch each shard started (ended or
    # not, its acknowledgements may not have gone out) is the one that can be unacknowledged.
    last_started: dict[str, list[int]] = {}
    for e in reports.entries:
        if e["life"] == "1" and e["phase"] == "start":
            last_started[e["items"][0][0]] = [item[2] for item in e["items"]]
    in_flight = {n for batch in last_started.values() for n in batch}
    handled: dict[int, int] = defaultdict(int)
    for e in reports.entries:
        if e["phase"] == "start":
            for item in e["items"]:
                handled[item[2]] += 1
    assert sorted(handled) == list(range(400)), "no gap"
    replayed = {n for n, count in handled.items() if count > 1}
    assert replayed <= in_flight, f"replays beyond the batches in flight at the kill: {replayed - in_flight}"
    assert len(in_flight) <= 4 * 10, "at most one batch per shard was in flight"
    for key, numbers in by_key(reports.entries).items():
        first_runs = list(dict.fromkeys(numbers))
        assert first_runs == sorted(first_runs), f"key {key} ran ahead"


# -- tumbling windows ---------------------------------------------------------------------------------------------


async def test_a_tumbling_windows_state_carries_across_invocations_to_its_final_invoke(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, config: Path
) -> None:
    add_function(handlers, "windows", "batch_size = 2\ntumbling_window = 2")
    await start(serve, config, "windows")
    reports = await subscribe(nc)
    await put(nc, range(1, 7), lambda n: "one-key")

    def finals() -> list[dict[str, Any]]:
        return [e for e in reports.ended("windows") if e["window"].get("isFinalInvokeForWindow")]

    await reports.wait_until(lambda: len(reports.done("windows")) == 6 and finals(), timeout=30)
    await put(nc, range(100, 101), lambda n: "one-key")
    await reports.wait_until(lambda: len(finals()) >= 2 and 100 in reports.done("windows"), timeout=30)
    windows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in reports.ended("windows"):
        windows[e["window"]["window"]["start"]].append(e)
    totals = [
        w[-1]["window"]["state"].get("sum") for w in windows.values() if w[-1]["window"]["isFinalInvokeForWindow"]
    ]
    assert sum(totals[:-1]) == 21 and totals[-1] == 100, f"each window's final state sums its own records: {totals}"
    for invocations in windows.values():
        states = [e["window"]["state"].get("sum", 0) for e in invocations]
        assert states == sorted(states), "the state grows from invocation to invocation"
        assert invocations[0]["window"]["state"] == {}, "a window starts with a fresh state"
        assert invocations[-1]["items"] == [] and invocations[-1]["window"]["isFinalInvokeForWindow"]


# -- Powertools, unchanged ------------------------------------------------------------------------------------------

POWERTOOLS_HANDLER = """
    # /// eventfn
    # [[triggers]]
    # type = "stream"
    # stream = "clicks"
    # starting_position = "TRIM_HORIZON"
    # batch_size = 10
    # batch_window = 1
    # [retry]
    # base_delay = 0.2
    # [environment]
    # MARKS = "{marks}"
    # ///
    '''Plain Lambda code: Powertools' batch processor over Kinesis records, with its parser's KinesisDataStreamModel.'''
    import json
    import os

    from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
    from aws_lambda_powertools.utilities.parser import parse
    from aws_lambda_powertools.utilities.parser.models import KinesisDataStreamModel

    import _probe

    processor = BatchProcessor(event_type=EventType.KinesisDataStreams)


    def record_handler(record):
        n = record.kinesis.data_as_json()["n"]
        _probe.report("probe.powertools", json.dumps({{"n": n, "seq": record.kinesis.sequence_number}}))
        mark = os.path.join(os.environ["MARKS"], str(n))
        if n == 3 and not os.path.exists(mark):  # fails the first time only (a mark file: any worker may retry)
            open(mark, "w").close()
            raise ValueError("not yet")


    def handler(event, context):
        parsed = parse(event=event, model=KinesisDataStreamModel)
        _probe.report("probe.powertools.batch", json.dumps([r.kinesis.sequenceNumber for r in parsed.Records]))
        return process_partial_response(
            event=event, record_handler=record_handler, processor=processor, context=context
        )
"""


async def test_powertools_kinesis_code_runs_unchanged_and_a_reported_failure_retries_from_its_sequence_number(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, config: Path
) -> None:
    config.write_text("[streams.clicks]\nshards = 1\n", encoding="utf-8")
    marks = handlers.parent / "marks"
    marks.mkdir()
    write_handler(handlers, "shop", POWERTOOLS_HANDLER.format(marks=marks))
    items, batches = Collector(), Collector()
    await nc.subscribe("probe.powertools", cb=items.on_message)
    await nc.subscribe("probe.powertools.batch", cb=batches.on_message)
    await nc.flush()
    await start(serve, config, "shop")
    await put(nc, range(6), lambda n: f"user-{n}")
    first, retry = [json.loads(t) for t in await batches.wait_for(2)]
    assert len(first) == 6
    assert retry == first[3:], "checkpointed before the failed record; the rest retried from it"
    seen = [json.loads(t)["n"] for t in await items.wait_for(9)]
    assert seen == [0, 1, 2, 3, 4, 5, 3, 4, 5]


# -- the CLI ------------------------------------------------------------------------------------------------------


async def test_stream_put_ls_and_describe_show_shards_checkpoints_and_iterator_age(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, config: Path
) -> None:
    add_function(handlers, "live", "batch_size = 5")
    add_function(handlers, "paused", "enabled = false")  # its consumers wait: a backlog with an iterator age
    service = await start(serve, config, "live", "paused")
    reports = await subscribe(nc)
    cli = ("--config", str(config), "stream")
    done = await service.acli(*cli, "put", "clicks", "--key", "user-1", '{"n": 0}')
    assert done.returncode == 0, done.stderr
    shard = shards.shard_id(shards.shard_of("user-1", 4))
    assert shard in done.stdout
    await put(nc, range(1, 11), lambda n: f"user-{n}")
    await reports.wait_until(lambda: len(reports.done("live")) == 11)

    listed = await service.acli(*cli, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    [clicks] = json.loads(listed.stdout)
    assert (clicks["stream"], clicks["shards"], clicks["records"], clicks["unrouted"]) == ("clicks", 4, 11, 0)
    assert clicks["lastSequence"] == 11

    described = await service.acli(*cli, "describe", "clicks", "--json")
    assert described.returncode == 0, described.stderr
    found = json.loads(described.stdout)
    assert [s["hashKeyRange"]["startingHashKey"] for s in found["shards"]] == [str(i * 2**126) for i in range(4)]
    assert sum(s["records"] for s in found["shards"]) == 11
    by_mapping = {m["mapping"]: m for m in found["mappings"]}
    index = shards.shard_of("user-1", 4)
    live, paused = by_mapping[f"live--t0--shard-{index}"], by_mapping[f"paused--t0--shard-{index}"]
    last = next(s["lastSequence"] for s in found["shards"] if s["shardId"] == shard)
    assert (live["checkpoint"], live["behind"], live["iteratorAgeMs"]) == (last, 0, 0)
    assert paused["checkpoint"] == 0 and paused["behind"] >= 1 and paused["paused"]
    assert paused["iteratorAgeMs"] > 0, "how long ago its first unprocessed record arrived"

    stats = await mapping_stats(nc, f"live--t0--shard-{index}")  # what `eventfn mappings --json` shows
    assert stats["shard_id"] == shard and stats["processed"] >= 1
    assert 0 <= stats["iterator_age_ms"] <= stats["max_iterator_age_ms"]

    table = await service.acli(*cli, "describe", "clicks")
    assert table.returncode == 0 and "ITERATOR AGE" in table.stdout and shard in table.stdout
    missing = await service.acli(*cli, "describe", "nope")
    assert missing.returncode == 1 and "not declared" in missing.stderr and "Traceback" not in missing.stderr
