"""The bucket watcher without NATS: record shapes (parsed by Powertools itself), key encoding, prefix and suffix
filters, trigger validation, ignore rules, symlink refusal, completeness, and the index: what a restart, a change
while stopped, an overwrite, a move and a second replica announce. Real files in a temporary directory; the
connector's state is `MemoryState`, and its publish a stand-in for JetStream's duplicate detection by event id.

`tests/test_bucket_e2e.py` runs the same behaviours through `eventfn serve` and a real nats-server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import anyio
import pytest
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import S3Model
from hypothesis import given
from hypothesis import strategies as st

from eventfn import events
from eventfn.config import read_function_settings
from eventfn.errors import ConfigError
from eventfn.filters import compile_filters, decode_body
from eventfn.sources.connector import Bound, Context
from eventfn.sources.memory import MemoryState
from eventfn.sources.records import source_arn
from eventfn_connectors.bucket import (
    BucketConnector,
    BucketSettings,
    BucketTrigger,
    S3Shape,
    encode_key,
    object_path,
)
from eventfn_connectors.bucket import files as bucket_files
from eventfn_connectors.bucket.files import Ignore, inspect, lstat_key, scan
from eventfn_connectors.bucket.records import Change, encode_record, record_for
from tests.test_powertools import Delivered

ARN = source_arn("EVENTFN", "thumbnail--uploads")


def put(key: str = "photos/red flower.jpg", **overrides: Any) -> Change:
    fields: dict[str, Any] = {
        "bucket": "uploads",
        "key": key,
        "name": "ObjectCreated:Put",
        "sequencer": "0017A3B2C1D0E0F102",
        "time_ns": 1_700_000_000_123_456_789,
        "size": 5,
        "etag": hashlib.md5(b"hello").hexdigest(),
    }
    return Change(**{**fields, **overrides})


def batch(*changes: Change) -> dict[str, Any]:
    subject = "eventfn.source.bucket.uploads.ObjectCreated.Put"
    messages = [Delivered(encode_record(record_for(c)), subject=subject) for c in changes]
    ids = [f"item-{i}" for i in range(len(changes))]
    value = json.loads(S3Shape().batch(messages, ids, ARN))
    assert isinstance(value, dict)
    return value


# -- records -------------------------------------------------------------------------------------------------------


def test_records_are_s3_event_notifications_that_powertools_parses() -> None:
    removed = put("old.txt", name="ObjectRemoved:Delete", size=None, etag=None, sequencer="0017A3B2C1D0E0F103")
    event = batch(put(), put("b.txt", name="ObjectCreated:Copy"), removed)
    parsed = parse(event=event, model=S3Model)
    assert [r.eventName for r in parsed.Records] == ["ObjectCreated:Put", "ObjectCreated:Copy", "ObjectRemoved:Delete"]
    first = event["Records"][0]
    assert first["eventVersion"] == "2.1" and first["eventSource"] == "aws:s3"
    assert first["eventTime"] == "2023-11-14T22:13:20.123Z"
    assert first["s3"]["s3SchemaVersion"] == "1.0"
    assert first["s3"]["bucket"] == {"name": "uploads", "ownerIdentity": {"principalId": "eventfn"},
                                     "arn": "arn:aws:s3:::uploads"}  # fmt: skip
    assert first["s3"]["object"] == {
        "key": "photos/red+flower.jpg",
        "size": 5,
        "eTag": "5d41402abc4b2a76b9719d911017c592",
        "sequencer": "0017A3B2C1D0E0F102",
    }
    assert list(first) == ["eventVersion", "eventSource", "awsRegion", "eventTime", "eventName", "userIdentity",
                           "requestParameters", "responseElements", "s3"]  # fmt: skip
    # A removal has neither size nor ETag, as S3's (and Powertools' rules for ObjectRemoved:* expect).
    assert event["Records"][2]["s3"]["object"] == {"key": "old.txt", "sequencer": "0017A3B2C1D0E0F103"}


def test_batch_sets_item_identifiers_and_the_trigger_name_per_mapping() -> None:
    event = batch(put("a"), put("b"))
    assert [r["responseElements"]["x-amz-request-id"] for r in event["Records"]] == ["item-0", "item-1"]
    assert {r["s3"]["configurationId"] for r in event["Records"]} == {"uploads"}
    assert all(r["responseElements"]["x-amz-id-2"] for r in event["Records"])


def test_a_batch_of_one_is_still_a_list_of_records() -> None:
    assert S3Shape.unwrap_single is False
    assert len(batch(put())["Records"]) == 1


def test_a_message_that_is_not_a_record_is_handed_over_not_dropped() -> None:
    messages = [Delivered(b'{"not": "a record"}'), Delivered(b"\xff not json")]
    event = json.loads(S3Shape().batch(messages, ["a", "b"], ARN))
    assert event["Records"] == [{"not": "a record"}, "\ufffd not json"]


def test_event_ids_are_deterministic_and_tell_changes_apart() -> None:
    assert put().event_id == put().event_id
    assert put(name="ObjectCreated:Copy").event_id == put().event_id, "a move taken for a put is the same event"
    assert put(sequencer="0017A3B2C1D0E0F103").event_id != put().event_id
    assert put(etag="0" * 32).event_id != put().event_id
    assert put(name="ObjectRemoved:Delete").event_id != put().event_id
    assert re.fullmatch(r"s3-[0-9a-f]{40}", put().event_id)


# -- keys ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "encoded"),
    [
        ("red flower.jpg", "red+flower.jpg"),  # S3's own example
        ("photos/2024/cat.jpg", "photos/2024/cat.jpg"),  # S3 keeps '/'
        ("a+b.txt", "a%2Bb.txt"),
        ("dt=2024-05-04/_SUCCESS", "dt%3D2024-05-04/_SUCCESS"),
        ("test/10:47:07.log", "test/10%3A47%3A07.log"),
        ("copy (1).pdf", "copy+%281%29.pdf"),
        ("naïve/日本.txt", "na%C3%AFve/%E6%97%A5%E6%9C%AC.txt"),
        ("~tilde*star", "%7Etilde*star"),
    ],
)
def test_keys_are_form_encoded_as_s3_does_with_slashes_kept(key: str, encoded: str) -> None:
    assert encode_key(key) == encoded
    assert unquote_plus(encoded) == key


@given(st.text(min_size=1))
def test_key_encoding_round_trips_and_keeps_prefixes(key: str) -> None:
    key = key.encode("utf-8", "replace").decode("utf-8", "replace")
    assert unquote_plus(encode_key(key)) == key
    for cut in range(len(key) + 1):
        assert encode_key(key).startswith(encode_key(key[:cut]))


KEY_TEXT = st.text(alphabet=st.sampled_from("aA9/ .-_+%é9A0日~"), max_size=8)


def key_filter_matches(trigger: BucketTrigger, key: str) -> bool:
    """Whether a record of `key` passes every one of the trigger's source filters, as the dispatcher applies them."""
    body = decode_body(encode_record(record_for(put(key))))
    document = {"subject": "s", "body": body, "headers": {}, "attributes": {}}
    return all(compile_filters([p], "t").matches(document) for p in trigger.key_filters())


@given(KEY_TEXT, KEY_TEXT, KEY_TEXT)
def test_prefix_and_suffix_filters_match_the_raw_key(key: str, prefix: str, suffix: str) -> None:
    trigger = BucketTrigger(bucket="uploads", prefix=prefix.lstrip("/"), suffix=suffix)
    expected = key.startswith(prefix.lstrip("/")) and key.endswith(suffix)
    assert key_filter_matches(trigger, key) == expected


def test_a_suffix_never_matches_the_tail_of_an_escape() -> None:
    # 'é' is %C3%A9: its encoding ends with "9", yet "é.jpg" does not end with "9.jpg".
    trigger = BucketTrigger(bucket="uploads", suffix="9.jpg")
    assert not key_filter_matches(trigger, "é.jpg")
    assert key_filter_matches(trigger, "cat9.jpg")
    assert not key_filter_matches(BucketTrigger(bucket="uploads", suffix="A9.jpg"), "é.jpg")
    assert key_filter_matches(BucketTrigger(bucket="uploads", suffix=".jpg", prefix="my folder/"), "my folder/é.jpg")


# -- trigger options -------------------------------------------------------------------------------------------------


def test_events_become_subjects_a_wildcard_covering_its_names() -> None:
    connector = BucketConnector(BucketSettings(), context())
    trigger = BucketTrigger(bucket="uploads", events=["s3:ObjectCreated:Put", "s3:ObjectCreated:*",
                                                      "s3:ObjectRemoved:Delete"])  # fmt: skip
    source = connector.source(Bound(function="f", mapping="f--t0", name="t0", trigger=trigger))
    assert source.subjects == (
        "eventfn.source.bucket.uploads.ObjectCreated.*",
        "eventfn.source.bucket.uploads.ObjectRemoved.Delete",
    )
    assert source.records == "s3" and source.kind == "bucket"
    assert BucketTrigger(bucket="uploads").events == ["s3:ObjectCreated:*"]


def settings_error(tmp_path: Path, trigger: str) -> str:
    handler = tmp_path / "thumbnail.py"
    handler.write_text(
        f'# /// eventfn\n# [[triggers]]\n# type = "bucket"\n# {trigger}\n# ///\ndef handler(e, c): pass\n'
    )
    with pytest.raises(ConfigError) as info:
        read_function_settings("thumbnail", handler, None, {})
    return str(info.value)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('bucket = "my.uploads"', "contains '.'"),
        ('bucket = "Uploads"', "lower-case letters"),
        ('bucket = "ab"', "3 to 63"),
        ('bucket = "uploads"\n# events = ["ObjectCreated:*"]', "S3's event names start with 's3:'"),
        ('bucket = "uploads"\n# events = ["s3:ObjectCreated:Patch"]', "s3:ObjectCreated:Put, s3:ObjectCreated:Post"),
        ('bucket = "uploads"\n# prefix = "/in"', "starts with '/'"),
        ('bucket = "uploads"\n# prefx = "in/"', "prefx"),
    ],
)
def test_bad_trigger_options_are_errors_naming_function_file_and_key(tmp_path: Path, line: str, expected: str) -> None:
    message = settings_error(tmp_path, line)
    assert "thumbnail.py" in message and "function thumbnail" in message
    assert expected in message


def test_a_missing_bucket_is_named() -> None:
    with pytest.raises(Exception, match="bucket"):
        import msgspec

        msgspec.convert({"type": "bucket"}, BucketTrigger)


def test_describe_shows_the_bucket_events_and_rules() -> None:
    trigger = BucketTrigger(bucket="uploads", prefix="in/", suffix=".jpg")
    assert trigger.describe() == ["bucket uploads: s3:ObjectCreated:* prefix 'in/' suffix '.jpg'"]


# -- files ----------------------------------------------------------------------------------------------------------


DEFAULT_IGNORE = Ignore(BucketSettings().ignore, hidden=True)


@pytest.mark.parametrize(
    "name",
    ["a.tmp", "a.part", ".a.swp", "a.swx", "notes~", ".#notes", "#notes#", "4913", "big.iso.crdownload", ".env"],
)
def test_temporary_partial_and_hidden_files_are_ignored(name: str) -> None:
    assert DEFAULT_IGNORE.name(name)
    assert DEFAULT_IGNORE.key(f"folder/{name}")


def test_ordinary_names_and_configured_ignores() -> None:
    assert not DEFAULT_IGNORE.key("photos/cat.jpg")
    assert DEFAULT_IGNORE.key(".git/config"), "anything inside a hidden folder"
    custom = Ignore(["*.log"], hidden=False)
    assert custom.key("a/b.log") and not custom.key(".env") and not custom.key("a.tmp")


def test_scan_lists_objects_and_never_follows_links(tmp_path: Path) -> None:
    bucket = tmp_path / "uploads"
    outside = tmp_path / "outside"
    (bucket / "sub dir").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (bucket / "sub dir" / "é.txt").write_text("x")
    (bucket / "a.tmp").write_text("partial")
    (bucket / "link.txt").symlink_to(outside / "secret.txt")
    (bucket / "linked-dir").symlink_to(outside)
    os.mkfifo(bucket / "fifo")
    found = scan(bucket, DEFAULT_IGNORE)
    assert set(found.objects) == {"sub dir/é.txt"}
    assert lstat_key(bucket, "link.txt", DEFAULT_IGNORE) is None
    assert lstat_key(bucket, "linked-dir/secret.txt", DEFAULT_IGNORE) is None
    assert lstat_key(bucket, "../outside/secret.txt", DEFAULT_IGNORE) is None
    assert lstat_key(bucket, "fifo", DEFAULT_IGNORE) is None
    assert inspect(bucket, "linked-dir/secret.txt").status == "gone"
    assert inspect(bucket, "link.txt").status == "gone"
    assert inspect(bucket, "fifo").status == "gone"


def test_a_file_open_for_writing_is_not_complete(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    with open(tmp_path / "b" / "big.bin", "wb") as writer:
        writer.write(b"first chunk")
        writer.flush()
        assert inspect(tmp_path / "b", "big.bin").status == "writing"
    done = inspect(tmp_path / "b", "big.bin")
    assert done.status == "complete" and done.etag == hashlib.md5(b"first chunk").hexdigest()


def test_object_path_joins_the_decoded_key_under_the_root_and_refuses_escapes(tmp_path: Path) -> None:
    record = json.loads(encode_record(record_for(put("in/red flower.jpg"))))
    assert object_path(record, tmp_path) == tmp_path / "uploads" / "in" / "red flower.jpg"
    escape = json.loads(encode_record(record_for(put("../../etc/passwd"))))
    with pytest.raises(ValueError, match=r"'\.\.'"):
        object_path(escape, tmp_path)
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "in").symlink_to("/etc")
    with pytest.raises(ValueError, match="symbolic link"):
        object_path(record, tmp_path)


# -- the watcher, driven step by step ----------------------------------------------------------------------------


@dataclass
class JetStream:
    """Stores events once per id, as JetStream's duplicate detection does (within its window)."""

    stored: list[tuple[str, events.Event]] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    arrived: anyio.Event = field(default_factory=anyio.Event)

    async def publish(self, subject: str, event: events.Event) -> Any:
        duplicate = event.id in self.ids
        if not duplicate:
            self.ids.add(event.id)
            self.stored.append((subject, event))
            self.arrived.set()
        return type("Published", (), {"duplicate": duplicate})()

    async def wait_for(self, count: int) -> list[tuple[str, str]]:
        with anyio.fail_after(10):
            while len(self.stored) < count:
                self.arrived = anyio.Event()
                await self.arrived.wait()
        return self.names()

    def names(self) -> list[tuple[str, str]]:
        out = []
        for _, event in self.stored:
            record = json.loads(event.data)
            out.append((record["eventName"], unquote_plus(record["s3"]["object"]["key"])))
        return out

    def take(self) -> list[tuple[str, str]]:
        names = self.names()
        self.stored.clear()
        return names


def context(stream: JetStream | None = None, state: MemoryState | None = None) -> Context:
    return Context("bucket", publish=(stream or JetStream()).publish, state=state or MemoryState(),
                   data_dir=Path("."))  # fmt: skip


def watcher(root: Path, stream: JetStream, state: MemoryState, **settings: Any) -> BucketConnector:
    connector = BucketConnector(BucketSettings(root=str(root), **settings), context(stream, state))
    trigger = BucketTrigger(bucket="uploads", events=["s3:ObjectCreated:*", "s3:ObjectRemoved:*"])
    connector.update([Bound(function="f", mapping="f--t0", name="t0", trigger=trigger)])
    return connector


async def settle(*connectors: BucketConnector) -> None:
    """Reconcile every queued key of each connector until none is left (no watcher running)."""
    for connector in connectors:
        queue = connector._queue
        while queue._pending or queue._due_at:
            if not queue._pending:
                for item in list(queue._due_at):
                    queue.add(item)
            item = await queue.get()
            delay = await connector._reconcile(*item)
            queue.done(item, None)
            if delay is not None:
                queue.add(item)
                await anyio.sleep(delay)


async def start(connector: BucketConnector) -> None:
    await connector._sync_buckets()
    await settle(connector)


def hint(connector: BucketConnector, *keys: str) -> None:
    for key in keys:
        connector._queue.add(("uploads", key))


async def changed(connector: BucketConnector, *keys: str) -> None:
    """What the watcher does when it reports `keys`."""
    hint(connector, *keys)
    await settle(connector)


@pytest.fixture
def bucket(tmp_path: Path) -> Path:
    (tmp_path / "uploads").mkdir()
    return tmp_path / "uploads"


async def test_first_watch_indexes_silently_then_announces_changes(bucket: Path) -> None:
    (bucket / "before.txt").write_text("there before")
    stream, state = JetStream(), MemoryState()
    connector = watcher(bucket.parent, stream, state)
    await start(connector)
    assert stream.take() == []
    (bucket / "new dir").mkdir()
    (bucket / "new dir" / "日本 語.txt").write_text("new")
    (bucket / "before.txt").write_text("overwritten")
    await changed(connector, "new dir/日本 語.txt", "before.txt")
    assert sorted(stream.names()) == [("ObjectCreated:Put", "before.txt"), ("ObjectCreated:Put", "new dir/日本 語.txt")]


async def test_announce_existing_announces_what_is_there_at_the_first_watch(bucket: Path) -> None:
    (bucket / "before.txt").write_text("there before")
    stream = JetStream()
    await start(watcher(bucket.parent, stream, MemoryState(), announce_existing=True))
    assert stream.take() == [("ObjectCreated:Put", "before.txt")]


async def test_overwrites_grow_the_sequencer_and_a_delete_follows_the_last(bucket: Path) -> None:
    stream = JetStream()
    connector = watcher(bucket.parent, stream, MemoryState())
    await start(connector)
    sequencers = []
    for content in ("one", "two", "three"):
        (bucket / "a.txt").write_text(content)
        await changed(connector, "a.txt")
        (_, event), *_ = stream.stored
        record = json.loads(event.data)
        assert record["s3"]["object"]["eTag"] == hashlib.md5(content.encode()).hexdigest()
        sequencers.append(record["s3"]["object"]["sequencer"])
        stream.stored.clear()
    (bucket / "a.txt").unlink()
    await changed(connector, "a.txt")
    (_, removed), *_ = stream.stored
    sequencers.append(json.loads(removed.data)["s3"]["object"]["sequencer"])
    assert sequencers == sorted(sequencers) and len(set(sequencers)) == 4
    assert removed.type == "com.amazonaws.s3.ObjectRemoved:Delete"


async def test_restart_announces_changes_made_while_stopped_and_nothing_else(bucket: Path) -> None:
    stream, state = JetStream(), MemoryState()
    for name in ("kept.txt", "changed.txt", "removed.txt"):
        (bucket / name).write_text(name)
    await start(watcher(bucket.parent, stream, state))  # first watch: indexed
    again = watcher(bucket.parent, stream, state)
    await start(again)
    assert stream.take() == [], "a restart without changes announces nothing"
    (bucket / "changed.txt").write_text("changed while stopped")
    (bucket / "removed.txt").unlink()
    (bucket / "added.txt").write_text("added while stopped")
    await start(watcher(bucket.parent, stream, state))
    assert sorted(stream.take()) == [
        ("ObjectCreated:Put", "added.txt"),
        ("ObjectCreated:Put", "changed.txt"),
        ("ObjectRemoved:Delete", "removed.txt"),
    ]
    await start(watcher(bucket.parent, stream, state))
    assert stream.take() == []


async def test_two_replicas_announce_each_change_once(bucket: Path) -> None:
    stream, state = JetStream(), MemoryState()
    first, second = watcher(bucket.parent, stream, state), watcher(bucket.parent, stream, state)
    await start(first)
    await start(second)
    (bucket / "a.txt").write_text("a")
    for replica in (first, second):
        hint(replica, "a.txt")
    await settle(second, first)
    (bucket / "a.txt").write_text("a, again")
    (bucket / "b.txt").write_text("b")
    for replica in (second, first):
        hint(replica, "a.txt", "b.txt")
    await settle(first, second)
    (bucket / "a.txt").unlink()
    for replica in (first, second):
        hint(replica, "a.txt")
    await settle(first, second)
    assert stream.take() == [
        ("ObjectCreated:Put", "a.txt"),
        ("ObjectCreated:Put", "a.txt"),
        ("ObjectCreated:Put", "b.txt"),
        ("ObjectRemoved:Delete", "a.txt"),
    ]


async def test_an_object_put_back_as_it_was_is_announced_again(bucket: Path) -> None:
    stream = JetStream()
    connector = watcher(bucket.parent, stream, MemoryState())
    await start(connector)
    (bucket / "a.txt").write_text("same")
    await changed(connector, "a.txt")
    (bucket / "a.txt").rename(bucket.parent / "aside.txt")
    await changed(connector, "a.txt")
    (bucket.parent / "aside.txt").rename(bucket / "a.txt")  # same content, same mtime
    await changed(connector, "a.txt")
    assert stream.take() == [("ObjectCreated:Put", "a.txt"), ("ObjectRemoved:Delete", "a.txt"),
                             ("ObjectCreated:Put", "a.txt")]  # fmt: skip


async def test_a_move_inside_the_bucket_is_a_copy_and_a_delete(bucket: Path) -> None:
    stream = JetStream()
    connector = watcher(bucket.parent, stream, MemoryState())
    await start(connector)
    (bucket / "a.txt").write_text("moved")
    await changed(connector, "a.txt")
    stream.take()
    (bucket / "done").mkdir()
    (bucket / "a.txt").rename(bucket / "done" / "a.txt")
    await changed(connector, "done/a.txt", "a.txt")
    assert stream.names() == [("ObjectCreated:Copy", "done/a.txt"), ("ObjectRemoved:Delete", "a.txt")]
    copied = json.loads(stream.stored[0][1].data)
    assert copied["s3"]["object"]["eTag"] == hashlib.md5(b"moved").hexdigest()


async def test_symlinks_and_ignored_files_are_never_objects(bucket: Path, tmp_path: Path) -> None:
    stream = JetStream()
    connector = watcher(bucket.parent, stream, MemoryState())
    await start(connector)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the root")
    (bucket / "link.txt").symlink_to(secret)
    (bucket / "photo.jpg.part").write_text("partial")
    await changed(connector, "link.txt", "photo.jpg.part", "../secret.txt")
    assert stream.take() == []


async def test_without_a_lease_a_file_counts_as_complete_after_the_settle_time(
    bucket: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bucket_files, "writers", lambda fd: "unknown")  # a filesystem without leases
    stream = JetStream()
    connector = watcher(bucket.parent, stream, MemoryState(), settle=0.3)
    await start(connector)
    (bucket / "a.txt").write_text("quiet")
    hint(connector, "a.txt")
    item = await connector._queue.get()
    assert await connector._reconcile(*item) == pytest.approx(0.3)
    assert stream.stored == []
    await anyio.sleep(0.3)
    assert await connector._reconcile(*item) is None
    assert stream.take() == [("ObjectCreated:Put", "a.txt")]


async def test_a_change_no_trigger_takes_is_indexed_not_published(bucket: Path) -> None:
    stream, state = JetStream(), MemoryState()
    connector = BucketConnector(BucketSettings(root=str(bucket.parent)), context(stream, state))
    connector.update([Bound(function="f", mapping="f--t0", name="t0", trigger=BucketTrigger(bucket="uploads"))])
    await start(connector)
    (bucket / "a.txt").write_text("a")
    await changed(connector, "a.txt")
    (bucket / "a.txt").unlink()
    await changed(connector, "a.txt")
    assert stream.take() == [("ObjectCreated:Put", "a.txt")]
    assert not connector._indexes["uploads"].entries["a.txt"].live


async def test_the_running_watcher_sees_new_folders_and_is_not_fooled_by_links(bucket: Path, tmp_path: Path) -> None:
    stream = JetStream()
    connector = watcher(bucket.parent, stream, MemoryState())
    async with anyio.create_task_group() as tg:
        await tg.start(connector.run)
        # A link back to the root: a recursive watch would follow it and report later files under its path.
        (bucket / "out").mkdir()
        (bucket / "out" / "loop").symlink_to(bucket.parent)
        (bucket / "out" / "everything").symlink_to("/")
        (bucket / "after.txt").write_text("after the links")
        assert await stream.wait_for(1) == [("ObjectCreated:Put", "after.txt")]
        # A folder tree moved in from outside the root reports only itself: what it holds is found by a scan.
        (tmp_path / "tree" / "a").mkdir(parents=True)
        (tmp_path / "tree" / "a" / "b.txt").write_text("b")
        (tmp_path / "tree").rename(bucket / "tree")
        assert (await stream.wait_for(2))[1] == ("ObjectCreated:Put", "tree/a/b.txt")
        (bucket / "tree" / "a" / "c.txt").write_text("c")  # and the moved-in folders are watched
        assert (await stream.wait_for(3))[2] == ("ObjectCreated:Put", "tree/a/c.txt")
        assert not [p for p in connector.folders.paths if "loop" in p or "everything" in p], "links are not watched"
        tg.cancel_scope.cancel()


def test_bucket_settings_are_checked_in_their_table(tmp_path: Path) -> None:
    from eventfn.config import load_service_config

    config = tmp_path / "eventfn.toml"
    config.write_text('[buckets]\nroot = "files"\nsettle = 0.5\n')
    assert load_service_config(config, {}).connectors["bucket"] == {"root": "files", "settle": 0.5}
    config.write_text("[buckets]\nsetle = 0.5\n")
    with pytest.raises(ConfigError, match=r"invalid setting in \[buckets\]: Object contains unknown field `setle`"):
        load_service_config(config, {})


async def test_names_that_cannot_be_keys_are_skipped_and_said_once(
    bucket: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stream = JetStream()
    connector = watcher(bucket.parent, stream, MemoryState())
    await start(connector)
    (bucket / os.fsdecode(b"caf\xe9.txt")).write_text("x")  # a Latin-1 name, not UTF-8
    long_key = "/".join(["k" * 250] * 4) + "/" + "x" * 30  # 1034 bytes
    (bucket / long_key).parent.mkdir(parents=True, exist_ok=True)
    (bucket / long_key).write_text("too long")
    await changed(connector, os.fsdecode(b"caf\xe9.txt"), long_key)
    await connector._cover("uploads")
    await settle(connector)
    assert stream.take() == []
    refusals = [r.getMessage() for r in caplog.records if "is not an object" in r.getMessage()]
    assert len(refusals) == 2 and any("UTF-8" in m for m in refusals) and any("1024" in m for m in refusals)


async def test_a_name_that_breaks_the_watch_loses_nothing_written_with_it(
    bucket: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # watchfiles fails the whole batch that holds a name it cannot decode (not UTF-8); the files reported with
    # it, and those written before a new watch is ready, are found by the re-scan that follows.
    stream = JetStream()
    connector = watcher(bucket.parent, stream, MemoryState())
    async with anyio.create_task_group() as tg:
        await tg.start(connector.run)
        (bucket / os.fsdecode(b"caf\xe9.txt")).write_text("not UTF-8")
        (bucket / "with it.txt").write_text("in the same batch")
        assert await stream.wait_for(1) == [("ObjectCreated:Put", "with it.txt")]
        (bucket / "after.txt").write_text("and the new watch sees the next")
        assert (await stream.wait_for(2))[1] == ("ObjectCreated:Put", "after.txt")
        tg.cancel_scope.cancel()
    assert "the watch failed (WatchfilesRustInternalError: Unable to decode path" in caplog.text


async def test_stopping_does_not_wait_for_a_huge_file_to_be_read(bucket: Path) -> None:
    stream = JetStream()
    connector = watcher(bucket.parent, stream, MemoryState())
    async with anyio.create_task_group() as tg:
        await tg.start(connector.run)
        (bucket / "huge.bin").touch()
        os.truncate(bucket / "huge.bin", 16 << 30)  # sparse: 16 GiB of zeros that take over a minute to hash
        (bucket / "small.txt").write_text("read on the event loop meanwhile")
        assert await stream.wait_for(1) == [("ObjectCreated:Put", "small.txt")]
        assert connector._limiter is not None
        with anyio.fail_after(10):
            # Nothing tells when a thread has started reading: its limiter's token does.
            while connector._limiter.borrowed_tokens == 0:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        started = anyio.current_time()
        tg.cancel_scope.cancel()
    assert anyio.current_time() - started < 5, "the stop waited for the file to be read"


async def test_a_buckets_root_that_is_a_file_is_named_as_the_problem(tmp_path: Path) -> None:
    (tmp_path / "root").write_text("not a folder")
    connector = watcher(tmp_path / "root", JetStream(), MemoryState())
    # Said by the connector's supervisor as "connector bucket failed: NotADirectoryError: ...", then tried again.
    problem = pytest.RaisesExc(NotADirectoryError, match=r"the buckets root .*/root is not a folder; make it one")
    with pytest.RaisesGroup(problem, flatten_subgroups=True), anyio.fail_after(10):
        await connector.run()


# -- changes the S3 API makes -------------------------------------------------------------------------------------


def renamed_in(bucket: Path, key: str, data: bytes) -> bucket_files.Stat:
    """What the S3 API does to put an object: a complete file renamed over the key."""
    staged = bucket.parent / "staged.tmp"
    staged.write_bytes(data)
    target = bucket / key
    target.parent.mkdir(parents=True, exist_ok=True)
    staged.rename(target)
    found = lstat_key(bucket, key, Ignore([], hidden=True))
    assert found is not None
    return found


async def test_a_change_the_api_applies_is_one_event_with_the_name_it_gives(bucket: Path) -> None:
    stream = JetStream()
    connector = watcher(bucket.parent, stream, MemoryState())
    await start(connector)

    def complete() -> bucket_files.Stat:
        found = renamed_in(bucket, "big/file.bin", b"assembled from parts")
        hint(connector, "big/file.bin")  # the kernel reports the rename while the API holds the key
        return found

    await connector.apply("uploads", "big/file.bin", complete, name="ObjectCreated:CompleteMultipartUpload",
                          etag="0123456789abcdef0123456789abcdef-2")  # fmt: skip
    assert stream.names() == [("ObjectCreated:CompleteMultipartUpload", "big/file.bin")], "announced before it returns"
    record = json.loads(stream.stored[0][1].data)["s3"]["object"]
    assert record["eTag"] == "0123456789abcdef0123456789abcdef-2" and record["size"] == 20
    await settle(connector)  # the hint finds the index up to date: nothing more
    assert stream.take() == [("ObjectCreated:CompleteMultipartUpload", "big/file.bin")]

    def removed() -> None:
        (bucket / "big" / "file.bin").unlink()
        hint(connector, "big/file.bin")

    await connector.apply("uploads", "big/file.bin", removed, name="ObjectRemoved:Delete", etag="")
    await settle(connector)
    assert stream.take() == [("ObjectRemoved:Delete", "big/file.bin")]


async def test_the_api_waits_for_a_worker_on_its_key_and_workers_never_get_a_claimed_key(bucket: Path) -> None:
    connector = watcher(bucket.parent, JetStream(), MemoryState())
    queue = connector._queue
    item = ("uploads", "k")
    queue.add(item)
    assert await queue.get() == item  # a worker has it
    claimed = anyio.Event()

    async def claim() -> None:
        await queue.claim(item)
        claimed.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(claim)
        await anyio.wait_all_tasks_blocked()
        assert not claimed.is_set(), "the API waits while a worker has the key"
        queue.add(item)  # hinted meanwhile: looked at again after
        queue.done(item, None)
        with anyio.fail_after(5):
            await claimed.wait()
    queue.add(item)  # hinted while the API has it
    other = ("uploads", "other")
    queue.add(other)
    with anyio.fail_after(5):
        assert await queue.get() == other, "a worker never gets the claimed key"
    queue.done(other, None)
    queue.done(item, None)
    with anyio.fail_after(5):
        assert await queue.get() == item, "what was hinted during the claim is reconciled after it"


async def test_an_api_change_whose_event_cannot_be_stored_is_announced_later(bucket: Path) -> None:
    from eventfn_connectors.bucket.watcher import NotAnnounced

    stream = JetStream()
    failing = {"left": 1}
    stored = stream.publish

    async def publish(subject: str, event: events.Event) -> Any:
        if failing["left"]:
            failing["left"] -= 1
            raise ConnectionError("NATS is unreachable")
        return await stored(subject, event)

    state = MemoryState()
    connector = BucketConnector(BucketSettings(root=str(bucket.parent)),
                                Context("bucket", publish=publish, state=state, data_dir=Path(".")))  # fmt: skip
    connector.update([Bound(function="f", mapping="f--t0", name="t0", trigger=BucketTrigger(bucket="uploads"))])
    await start(connector)
    with pytest.raises(NotAnnounced, match="its event could not be stored yet"):
        await connector.apply("uploads", "a.txt", lambda: renamed_in(bucket, "a.txt", b"a"),
                              name="ObjectCreated:Put", etag=hashlib.md5(b"a").hexdigest())  # fmt: skip
    assert (bucket / "a.txt").exists() and stream.names() == []
    await settle(connector)  # the workers try again, as for any change they find
    assert stream.take() == [("ObjectCreated:Put", "a.txt")]
