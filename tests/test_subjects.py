"""NATS subject algebra: overlaps, covers, matches, reserved subjects and the events stream's subject set."""

from __future__ import annotations

import pytest

from eventfn.subjects import RESERVED, covers, matches, overlaps, reserved_overlap, stream_subjects

OVERLAPS = [
    ("a.b", "a.b", True),
    ("a.b", "a.c", False),
    ("a.*", "a.b", True),
    ("a.*", "*.b", True),
    ("a.*", "b.*", False),
    ("a.>", "a.b.c", True),
    ("a.>", "a", False),  # `>` needs at least one more token
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),
    ("a.*.c", "a.b.>", True),
    ("a.*.c", "a.b.d", False),
    (">", "anything.at.all", True),
    (">", "x", True),
    ("*", "a.b", False),
    ("*.*", "a.b", True),
    ("a.b.c", "a.b", False),
    ("eventfn.>", "*.invoke.fn", True),
]


@pytest.mark.parametrize(("a", "b", "expected"), OVERLAPS)
def test_overlaps_truth_table(a: str, b: str, expected: bool) -> None:
    assert overlaps(a, b) is expected


@pytest.mark.parametrize(("a", "b", "expected"), OVERLAPS)
def test_overlaps_is_symmetric(a: str, b: str, expected: bool) -> None:
    assert overlaps(b, a) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.b", "a.*", False),
        ("a.*", "a.*", True),
        ("a.>", "a.*", True),
        ("a.>", "a.b.c", True),
        ("a.>", "a.>", True),
        ("a.*", "a.>", False),
        ("*.*", "a.>", False),
        ("a.>", "a", False),
        ("a.b.c", "a.b", False),
        ("a.b", "a.b.c", False),
        (">", "a.b", True),
        (">", ">", True),
        ("a.>", ">", False),
        ("*.b", "a.b", True),
        ("*.b", "a.c", False),
        ("a.*.c", "a.b.>", False),
    ],
)
def test_covers_truth_table(a: str, b: str, expected: bool) -> None:
    assert covers(a, b) is expected


@pytest.mark.parametrize(
    ("filter_", "subject", "expected"),
    [
        ("events.orders.new", "events.orders.new", True),
        ("events.orders.*", "events.orders.new", True),
        ("events.orders.*", "events.orders.new.eu", False),
        ("events.orders.*", "events.orders", False),
        ("events.>", "events.orders.new.eu", True),
        ("events.>", "events", False),
        ("*.orders.*", "events.orders.new", True),
        ("events.payments.*", "events.orders.new", False),
        (">", "x", True),
    ],
)
def test_matches_truth_table(filter_: str, subject: str, expected: bool) -> None:
    assert matches(filter_, subject) is expected


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("events.>", None),
        ("events.orders", None),
        ("eventfn.async.fn", "eventfn.>"),
        ("*.dlq.fn", "eventfn.>"),
        ("_INBOX.x.y", "_INBOX.>"),
        ("$SYS.REQ.>", "$SYS.>"),
        ("$KV.bucket.key", "$KV.>"),
        ("$O.store.x", "$O.>"),
        ("$JS.API.INFO", "$JS.>"),
        (">", RESERVED[0]),
        ("eventfn", None),  # the bare token is not under `eventfn.>`
    ],
)
def test_reserved_overlap(subject: str, expected: str | None) -> None:
    assert reserved_overlap(subject) == expected


# -- stream_subjects ---------------------------------------------------------------------------------------------


def test_uncovered_trigger_is_added() -> None:
    subjects, problems = stream_subjects(["events.>"], ["orders.new"])
    assert subjects == ["events.>", "orders.new"]
    assert problems == {}


def test_covered_trigger_is_dropped() -> None:
    subjects, problems = stream_subjects(["events.>"], ["events.orders.*", "events.payments.eu"])
    assert subjects == ["events.>"]
    assert problems == {}


def test_wider_trigger_replaces_narrower_subjects() -> None:
    subjects, problems = stream_subjects(["events.>", "orders.new", "orders.old"], ["orders.*"])
    assert subjects == ["events.>", "orders.*"]
    assert problems == {}


def test_later_trigger_replaces_earlier_narrower_trigger() -> None:
    subjects, problems = stream_subjects([], ["orders.new", "orders.>"])
    assert subjects == ["orders.>"]
    assert problems == {}


def test_trigger_covered_by_earlier_trigger_is_dropped() -> None:
    subjects, problems = stream_subjects([], ["orders.>", "orders.new"])
    assert subjects == ["orders.>"]
    assert problems == {}


def test_partial_overlap_is_reported_and_not_added() -> None:
    subjects, problems = stream_subjects(["events.>", "orders.new.>"], ["orders.*.eu"])
    assert subjects == ["events.>", "orders.new.>"]
    assert list(problems) == ["orders.*.eu"]
    assert "'orders.new.>'" in problems["orders.*.eu"]
    assert "[stream] subjects" in problems["orders.*.eu"]


def test_partial_overlap_does_not_stop_later_triggers() -> None:
    subjects, problems = stream_subjects(["orders.new.>"], ["orders.*.eu", "payments.>"])
    assert subjects == ["orders.new.>", "payments.>"]
    assert set(problems) == {"orders.*.eu"}


def test_wider_trigger_replaces_narrower_subject_and_keeps_disjoint_ones() -> None:
    subjects, problems = stream_subjects(["orders.new", "orders.x.>"], ["orders.*"])
    assert subjects == ["orders.x.>", "orders.*"]
    assert problems == {}


def test_trigger_covering_one_subject_but_partly_overlapping_another_changes_nothing() -> None:
    subjects, problems = stream_subjects(["orders.a.b", "orders.*.c"], ["orders.a.*"])
    assert subjects == ["orders.a.b", "orders.*.c"]
    assert set(problems) == {"orders.a.*"}
    assert "'orders.*.c'" in problems["orders.a.*"]


def test_duplicates_are_removed_and_order_kept() -> None:
    subjects, problems = stream_subjects(["events.>", "audit.>", "events.>"], ["jobs.x", "jobs.x"])
    assert subjects == ["events.>", "audit.>", "jobs.x"]
    assert problems == {}


def test_result_never_holds_overlapping_subjects() -> None:
    base = ["events.>", "orders.new", "orders.eu.*"]
    triggers = ["orders.*", "orders.*.*", "events.a", "audit.x.y", "audit.*.y", "audit.>", "orders.eu.>"]
    subjects, _ = stream_subjects(base, triggers)
    for i, a in enumerate(subjects):
        for b in subjects[i + 1 :]:
            assert not overlaps(a, b), (a, b)
