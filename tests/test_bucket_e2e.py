"""The bucket watcher end to end: `eventfn serve` as a subprocess on a real nats-server, files written into a
buckets folder as a user (or a program) writes them, and handlers that report what they receive to a probe
subject.

Where a test checks that something produced *no* event, it writes a last file and waits for that file's event:
the watcher handles changes in the order the kernel reports them, so an event the earlier change wrongly caused
would have come first.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from eventfn.testing import NatsServer, Serve, write_handler
from tests.conftest import Collector

pytestmark = pytest.mark.e2e

Probe = Callable[[str], Awaitable[Collector]]

#: What each handler reports: one line per record, after checking the batch with Powertools' own model.
REPORTER = """
    # /// eventfn
    # triggers = [TRIGGERS]
    # retry = { max_attempts = 0 }
    # ///
    import hashlib
    import json
    from _probe import report
    from aws_lambda_powertools.utilities.parser import parse
    from aws_lambda_powertools.utilities.parser.models import S3Model
    from eventfn_connectors.bucket import decode_key, object_path


    def handler(event, context):
        parse(event=event, model=S3Model)  # raises if Powertools does not take the batch as it is
        for record in event["Records"]:
            path = object_path(record)
            data = path.read_bytes() if record["eventName"].startswith("ObjectCreated") else None
            report("probe.SUBJECT", json.dumps({
                "name": record["eventName"],
                "key": decode_key(record["s3"]["object"]["key"]),
                "encoded": record["s3"]["object"]["key"],
                "size": record["s3"]["object"].get("size"),
                "etag": record["s3"]["object"].get("eTag"),
                "sequencer": record["s3"]["object"]["sequencer"],
                "configuration": record["s3"]["configurationId"],
                "content": data.decode(errors="replace") if data is not None else None,
                "read_md5": hashlib.md5(data).hexdigest() if data is not None else None,
                "batch": len(event["Records"]),
            }))
        if FAIL:
            raise RuntimeError("this handler fails")
"""


def reporter(handlers: Path, name: str, triggers: str, *, fail: bool = False) -> None:
    code = textwrap.dedent(REPORTER).replace("TRIGGERS", triggers).replace("SUBJECT", name)
    write_handler(handlers, name, code.replace("FAIL", str(fail)))


def config(tmp_path: Path, root: Path) -> list[str]:
    toml = tmp_path / "eventfn.toml"
    toml.write_text(f'[buckets]\nroot = "{root}"\n')
    return ["--config", str(toml)]


def seen(collector: Collector) -> list[dict[str, Any]]:
    return [json.loads(text) for text in collector.texts]


async def until_keys(collector: Collector, *keys: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Everything reported once each of `keys` has been reported at least once."""
    with anyio.fail_after(timeout):
        while not set(keys) <= {r["key"] for r in seen(collector)}:
            await collector.wait_for(len(collector.messages) + 1, timeout=timeout)
    return seen(collector)


async def flushed(collector: Collector, bucket: Path, *, name: str = "zz-flush.txt") -> list[dict[str, Any]]:
    """Everything reported before and with a last file's event: what earlier changes wrongly caused, if anything,
    has been published by then (each change is handled within the same debounce window or an earlier one)."""
    (bucket / name).write_text("flush")
    reports = await until_keys(collector, name)
    assert [r["key"] for r in reports].count(name) == 1
    return [r for r in reports if r["key"] != name]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


async def test_files_become_s3_events_once_complete(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], probe: Probe
) -> None:
    root = tmp_path / "buckets"
    uploads = root / "uploads"
    all_events = (
        '{ type = "bucket", bucket = "uploads", name = "all", events = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"] }'
    )
    reporter(handlers, "all", all_events)
    reporter(
        handlers, "jpegs", '{ type = "bucket", bucket = "uploads", name = "jpegs", prefix = "in/", suffix = ".jpg" }'
    )
    everything = await probe("probe.all")
    jpegs = await probe("probe.jpegs")
    service = await serve(extra_args=config(tmp_path, root))
    await service.log.await_line(r"bucket uploads: first watch")
    assert uploads.is_dir(), "the folder of a bucket a trigger names is created"

    # A large file written slowly through one handle: one event, after its last byte.
    chunks = [os.urandom(64 * 1024) for _ in range(4)]
    async with await anyio.open_file(uploads / "slow.bin", "wb") as writer:
        for chunk in chunks:
            await writer.write(chunk)
            await writer.flush()
            await anyio.sleep(0.3)  # the writer is slow: this is the behaviour under test, not a wait
        assert seen(everything) == [], "nothing is announced while the file is still being written"
    (slow,) = await until_keys(everything, "slow.bin")
    assert slow["name"] == "ObjectCreated:Put" and slow["size"] == 4 * 64 * 1024
    assert slow["etag"] == slow["read_md5"] == md5(b"".join(chunks)) and slow["configuration"] == "all"

    # Renamed into place from a temporary file (ignored), and from outside the root: both count as created.
    (uploads / "report.pdf.part").write_bytes(b"report")
    (uploads / "report.pdf.part").rename(uploads / "report.pdf")
    (tmp_path / "outside.txt").write_text("moved in")
    (tmp_path / "outside.txt").rename(uploads / "moved in.txt")
    # Nested folders, spaces and unicode.
    (uploads / "in" / "sub dir").mkdir(parents=True)
    (uploads / "in" / "sub dir" / "日本 語+1.txt").write_text("unicode")
    # Prefix and suffix: only in/...jpg reaches `jpegs`.
    for key in ("in/cat.jpg", "in/cat.png", "out/cat.jpg", "in/é.jpg"):
        (uploads / key).parent.mkdir(parents=True, exist_ok=True)
        (uploads / key).write_text(key)
    # A symbolic link to a file outside the root is never an object.
    (tmp_path / "secret.txt").write_text("secret")
    (uploads / "secret-link.txt").symlink_to(tmp_path / "secret.txt")
    (uploads / "out" / "to-outside").symlink_to(tmp_path)
    (uploads / "done.txt").write_text("last")
    expected = {"slow.bin", "report.pdf", "moved in.txt", "in/sub dir/日本 語+1.txt", "in/cat.jpg", "in/cat.png",
                "out/cat.jpg", "in/é.jpg", "done.txt"}  # fmt: skip
    await until_keys(everything, *expected)
    await until_keys(jpegs, "in/cat.jpg", "in/é.jpg")
    reports = await flushed(everything, uploads, name="in/zz-flush.jpg")  # the flush reaches both functions
    found = {r["key"]: r for r in reports}
    assert set(found) == expected
    assert len(reports) == len(expected), "one event per object"
    assert found["report.pdf"]["content"] == "report" and found["moved in.txt"]["content"] == "moved in"
    unicode = found["in/sub dir/日本 語+1.txt"]
    assert unicode["encoded"] == "in/sub+dir/%E6%97%A5%E6%9C%AC+%E8%AA%9E%2B1.txt" and unicode["content"] == "unicode"
    only = await until_keys(jpegs, "in/zz-flush.jpg")
    assert sorted(r["key"] for r in only) == ["in/cat.jpg", "in/zz-flush.jpg", "in/é.jpg"]

    # An overwrite is a new Put with a greater sequencer; a delete follows it.
    everything.messages.clear()
    (uploads / "done.txt").write_text("overwritten")
    (overwritten,) = await until_keys(everything, "done.txt")
    assert overwritten["content"] == "overwritten" and overwritten["sequencer"] > found["done.txt"]["sequencer"]
    (uploads / "done.txt").unlink()
    await everything.wait_for(2)
    removed = seen(everything)[1]
    assert removed == {**removed, "name": "ObjectRemoved:Delete", "key": "done.txt", "size": None, "etag": None}
    assert removed["sequencer"] > overwritten["sequencer"]


async def test_bucket_events_go_through_batching_filters_and_the_dlq(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], probe: Probe
) -> None:
    root = tmp_path / "buckets"
    size_over_1 = """'{"body": {"s3": {"object": {"size": [{"numeric": [">", 1]}]}}}}'"""
    batched = (
        '{ type = "bucket", bucket = "batched", name = "b", batch_size = 10, batch_window = 1.0, '
        f"filters = [{size_over_1}] }}"
    )
    reporter(handlers, "batched", batched)
    reporter(handlers, "broken", '{ type = "bucket", bucket = "failing", name = "f" }', fail=True)
    reports = await probe("probe.batched")
    dead = await probe("eventfn.dlq.broken")
    service = await serve(extra_args=config(tmp_path, root))
    await service.log.await_line(r"bucket watcher: watching 2 bucket")
    for i in range(6):
        (root / "batched" / f"f{i}.txt").write_text("x" if i == 0 else "big enough")  # f0 is filtered out
    records = [json.loads(t) for t in await reports.wait_for(5)]
    assert sorted(r["key"] for r in records) == [f"f{i}.txt" for i in range(1, 6)]
    assert max(r["batch"] for r in records) > 1, "records arrive batched, as {'Records': [...]}"
    (root / "failing" / "poison.txt").write_text("fails")
    (letter,) = [json.loads(t) for t in await dead.wait_for(1)]
    (record,) = (
        letter["requestPayload"]["Records"] if "Records" in letter["requestPayload"] else [letter["requestPayload"]]
    )
    assert record["eventName"] == "ObjectCreated:Put" and record["s3"]["object"]["key"] == "poison.txt"
    assert letter["responsePayload"]["errorMessage"] == "this handler fails"


async def test_changes_while_stopped_appear_at_the_next_start_and_nothing_else(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], probe: Probe
) -> None:
    root = tmp_path / "buckets"
    (root / "uploads").mkdir(parents=True)
    (root / "uploads" / "old.txt").write_text("there before the first start")
    reporter(
        handlers,
        "all",
        '{ type = "bucket", bucket = "uploads", events = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"] }',
    )
    everything = await probe("probe.all")
    args = config(tmp_path, root)
    service = await serve(extra_args=args)
    await service.log.await_line(r"first watch: 1 object\(s\) already there indexed without events")
    for name in ("kept.txt", "changed.txt", "removed.txt"):
        (root / "uploads" / name).write_text(name)
    await everything.wait_for(3)
    await service.astop()

    (root / "uploads" / "changed.txt").write_text("changed while stopped")
    (root / "uploads" / "removed.txt").unlink()
    (root / "uploads" / "added.txt").write_text("added while stopped")
    everything.messages.clear()
    service = await serve(extra_args=args)
    await service.log.await_line(r"bucket uploads: watching .*; 4 object\(s\) indexed, 3 change\(s\)")
    got = sorted((r["name"], r["key"]) for r in [json.loads(t) for t in await everything.wait_for(3)])
    assert got == [("ObjectCreated:Put", "added.txt"), ("ObjectCreated:Put", "changed.txt"),
                   ("ObjectRemoved:Delete", "removed.txt")]  # fmt: skip
    await service.astop()

    everything.messages.clear()
    service = await serve(extra_args=args)
    await service.log.await_line(r"bucket uploads: watching .*; 4 object\(s\) indexed, 0 change\(s\)")
    (root / "uploads" / "after.txt").write_text("after a restart without changes")
    assert [r["key"] for r in await until_keys(everything, "after.txt")] == ["after.txt"]


async def test_two_replicas_on_one_root_announce_each_change_once(
    tmp_path: Path, handlers: Path, nats_server: NatsServer, probe: Probe
) -> None:
    root = tmp_path / "buckets"
    reporter(
        handlers, "all", '{ type = "bucket", bucket = "shared", events = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"] }'
    )
    everything = await probe("probe.all")
    env = {"PROBE_NATS": nats_server.url}
    replicas = [
        Serve(handlers, nats_server.url, tmp_path / f"data{i}", extra_args=config(tmp_path, root), env=env)
        for i in (1, 2)
    ]
    try:
        for replica in replicas:
            await replica.astart()
            await replica.log.await_line(r"bucket watcher: watching 1 bucket")
        for i in range(5):
            (root / "shared" / f"{i}.txt").write_text(str(i))
        await until_keys(everything, *(f"{i}.txt" for i in range(5)))
        (root / "shared" / "0.txt").write_text("overwritten")
        (root / "shared" / "1.txt").unlink()
        while not {("ObjectCreated:Put", "0.txt", "overwritten"), ("ObjectRemoved:Delete", "1.txt", None)} <= {
            (r["name"], r["key"], r["content"]) for r in seen(everything)
        }:
            await everything.wait_for(len(everything.messages) + 1)
        reports = await flushed(everything, root / "shared")
        for replica in replicas:  # both saw the changes; one of them announced each
            await replica.log.await_line(r"ObjectCreated:Put 'zz-flush.txt'|'zz-flush.txt' was announced already")
        changes = [(r["name"], r["key"], r["sequencer"]) for r in reports]
        assert len(changes) == len(set(changes)), f"a change announced twice: {sorted(changes)}"
        assert sorted((name, key) for name, key, _ in changes) == sorted(
            [
                *(("ObjectCreated:Put", f"{i}.txt") for i in range(5)),
                ("ObjectCreated:Put", "0.txt"),
                ("ObjectRemoved:Delete", "1.txt"),
            ]
        )
    finally:
        for replica in replicas:
            await replica.astop()


async def test_the_index_works_with_the_embedded_servers_access_control(tmp_path: Path, handlers: Path) -> None:
    # The service's own NATS user lists a bucket's index (a KV watch): refused, the bucket would not be watched.
    root = tmp_path / "buckets"
    (root / "uploads").mkdir(parents=True)
    (root / "uploads" / "there.txt").write_text("indexed at the first watch")
    reporter(handlers, "all", '{ type = "bucket", bucket = "uploads" }')
    async with Serve(handlers, None, tmp_path / "data", extra_args=config(tmp_path, root)) as service:
        await service.log.await_line(r"bucket uploads: first watch: 1 object")
    async with Serve(handlers, None, tmp_path / "data", extra_args=config(tmp_path, root)) as service:
        await service.log.await_line(r"bucket uploads: watching .*; 1 object\(s\) indexed, 0 change\(s\)")
