"""Poison messages against a real `eventfn serve`: each ends in the DLQ with a clear error, and the service
keeps running, across a SIGKILL and restart too (issue 8, section 1)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.client import Client
from nats.js.api import DiscardPolicy

from eventfn.sources import records
from eventfn.testing import NatsServer, Serve, wait_stats, write_handler
from tests.conftest import FAST_RECOVERY

pytestmark = pytest.mark.e2e

#: The reproduction from the issue: 2 KB of JSON nested past every decoder's recursion limit.
POISON = b"[" * 1000 + b"]" * 1000

ECHO = """
    # /// eventfn
    # [retry]
    # max_attempts = {attempts}
    # base_delay = 0.2
    # max_delay = 0.5
    # ///
    import json
    import _probe

    def handler(event, context):
        _probe.report("probe.{name}", json.dumps(event))
        return event
"""


def echo_handler(handlers: Path, name: str, attempts: int = 1) -> None:
    """A function that reports each event it gets to `probe.<name>`; failed events get `attempts` retries."""
    write_handler(handlers, name, ECHO.replace("{name}", name).replace("{attempts}", str(attempts)))


async def cli(nats_server: NatsServer, *args: str) -> tuple[int, str, str]:
    """Run `eventfn ARGS --nats URL` as a user would (without blocking the test's event loop)."""
    result = await anyio.run_process([sys.executable, "-m", "eventfn", *args, "--nats", nats_server.url], check=False)
    return result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")


async def dlq_record(nc: Client, function: str) -> dict[str, Any]:
    record = await nc.jetstream().get_last_msg("EVENTFN_DLQ", f"eventfn.dlq.{function}")
    value: dict[str, Any] = json.loads(record.data)
    return value


def alive(service: Serve) -> bool:
    return service.process is not None and service.process.poll() is None


async def test_a_body_nested_too_deep_ends_in_the_dlq_and_the_service_stays_up(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, nats_server: NatsServer, probe: Any
) -> None:
    echo_handler(handlers, "deep")
    service = await serve()
    seen = await probe("probe.deep")
    await nc.publish("eventfn.async.deep", POISON)  # exactly what `nats pub eventfn.async.deep "[[[…]]]"` sends
    stats = await wait_stats(nc, "deep--async", dead_lettered=1, timeout=30)
    assert (stats["invocations"], stats["retried"]) == (2, 1)

    record = await dlq_record(nc, "deep")
    assert record["requestContext"]["condition"] == "RetriesExhausted"
    assert record["requestContext"]["approximateInvokeCount"] == 2
    error = record["responsePayload"]
    assert error["errorType"] == "Runtime.UnmarshalError"
    assert "could not be parsed as JSON" in error["errorMessage"]
    assert "nested too deeply" in error["errorMessage"]
    # The payload is kept byte for byte, as text: it is not JSON eventfn can parse.
    assert record["requestPayload"] == POISON.decode()
    assert record["eventfn"]["subject"] == "eventfn.async.deep"

    code, out, err = await cli(nats_server, "dlq", "ls", "deep")
    assert code == 0, err
    assert "Traceback" not in out + err
    assert "Runtime.UnmarshalError" in out
    code, out, err = await cli(nats_server, "dlq", "show", str(record_id(out)))
    assert code == 0, err
    assert "Runtime.UnmarshalError" in out

    await nc.publish("eventfn.async.deep", b'{"after": "poison"}')
    assert [json.loads(t) for t in await seen.wait_for(1, timeout=30)] == [{"after": "poison"}]
    assert alive(service)
    assert "Traceback" not in service.log.text()


def record_id(listing: str) -> int:
    """The id of the only record in an `eventfn dlq ls` table."""
    [row] = listing.splitlines()[1:]
    return int(row.split()[0])


async def test_a_poison_message_left_unsettled_by_a_sigkill_does_not_stop_the_restarted_service(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe: Any
) -> None:
    echo_handler(handlers, "deep", attempts=2)
    # An event published just after the kill can still be handed to the killed service's last pull request (the
    # server has not yet seen its connection close): it comes back after its ack wait, 6 s with FAST_RECOVERY
    # instead of 13 s (one run in four took 15 s instead of 2.5 s).
    service = await serve(config=FAST_RECOVERY)
    js = nc.jetstream()
    await js.publish("eventfn.async.deep", POISON)
    # Killed after the first attempt failed and before the event is settled for good: it stays in the stream.
    stats = await wait_stats(nc, "deep--async", retried=1, timeout=30)
    assert stats["last_error"] == "Runtime.UnmarshalError"
    service.kill()
    await js.publish("eventfn.async.deep", b'{"n": 1}')  # waits in the stream behind the poison

    seen = await probe("probe.deep")
    restarted = await serve(config=FAST_RECOVERY)
    await wait_stats(nc, "deep--async", dead_lettered=1, timeout=60)
    assert [json.loads(t) for t in await seen.wait_for(1, timeout=60)] == [{"n": 1}]
    record = await dlq_record(nc, "deep")
    assert record["requestContext"]["condition"] == "RetriesExhausted"
    assert record["responsePayload"]["errorType"] == "Runtime.UnmarshalError"
    assert alive(restarted)

    # And once more with the poison still pending at start-up: the issue's crash loop began "within milliseconds
    # of ready".
    restarted.kill()
    await js.publish("eventfn.async.deep", POISON)
    await js.publish("eventfn.async.deep", b'{"n": 2}')
    again = await serve(config=FAST_RECOVERY)
    await wait_stats(nc, "deep--async", dead_lettered=1, timeout=30)
    assert (await dlq_record(nc, "deep"))["requestContext"]["condition"] == "RetriesExhausted"
    assert [json.loads(t) for t in await seen.wait_for(2, timeout=60)][-1] == {"n": 2}
    assert alive(again)


async def test_poison_on_a_filtered_trigger_and_inside_a_batch_is_dead_lettered_alone(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe: Any
) -> None:
    write_handler(
        handlers,
        "picky",
        """
        # /// eventfn
        # [[triggers]]
        # subjects = ["events.poison.>"]
        # filters = ['{"subject": [{"prefix": "events.poison.keep"}]}', '{"body": {"keep": [true]}}']
        # [retry]
        # max_attempts = 0
        # ///
        import json
        import _probe

        def handler(event, context):
            _probe.report("probe.picky", json.dumps(event))
        """,
    )
    write_handler(
        handlers,
        "batcher",
        """
        # /// eventfn
        # [[triggers]]
        # subjects = ["events.batch.>"]
        # batch_size = 10
        # batch_window = 1.0
        # [retry]
        # max_attempts = 1
        # base_delay = 0.2
        # ///
        import json
        import _probe

        def handler(event, context):
            failures = []
            for record in event["Records"]:
                try:
                    body = json.loads(record["body"])
                except (ValueError, RecursionError):  # Python's json fails on the poison too
                    failures.append({"itemIdentifier": record["messageId"]})
                    continue
                _probe.report("probe.batcher", json.dumps(body))
            return {"batchItemFailures": failures}
        """,
    )
    service = await serve()
    picky, batcher = await probe("probe.picky"), await probe("probe.batcher")
    structured = {"content-type": "application/cloudevents+json"}
    broken_event = b'{"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": ' + POISON + b"}"

    await nc.publish("events.poison.keep.deep", POISON)  # passes the subject pattern, fails in the worker
    await nc.publish("events.poison.keep.event", broken_event, headers=structured)  # cannot be normalized
    await nc.publish("events.poison.drop", POISON)  # matches no pattern: filtered, never run
    await nc.publish("events.poison.other", b'{"keep": true}')

    for n in range(3):
        await nc.publish("events.batch.in", json.dumps({"n": n}).encode())
    await nc.publish("events.batch.in", POISON)
    await nc.publish("events.batch.in", broken_event, headers=structured)
    for n in range(3, 5):
        await nc.publish("events.batch.in", json.dumps({"n": n}).encode())
    await nc.flush()

    await wait_stats(nc, "batcher--t0", dead_lettered=2, timeout=30)
    stats = await wait_stats(nc, "picky--t0", dead_lettered=2, timeout=30)
    assert [json.loads(t) for t in await picky.wait_for(1, timeout=30)] == [{"keep": True}]
    assert sorted(json.loads(t)["n"] for t in await batcher.wait_for(5, timeout=30)) == [0, 1, 2, 3, 4]
    # One event at a time, in order: the poison published before {"keep": true} was filtered out, never run.
    assert stats["filtered"] == 1

    js = nc.jetstream()
    assert (await js.stream_info("EVENTFN_DLQ")).state.messages == 4
    errors, attempts = {}, {}
    for seq in range(1, 5):
        record = json.loads((await js.get_msg("EVENTFN_DLQ", seq)).data)
        function = record["requestContext"]["functionArn"].rsplit(":", 1)[1]
        errors[function, record["requestContext"]["condition"]] = record["responsePayload"]
        attempts[function, record["requestContext"]["condition"]] = record["requestContext"]["approximateInvokeCount"]
    assert attempts["picky", "RetriesExhausted"] == 1 and attempts["batcher", "RetriesExhausted"] == 2
    assert errors["picky", "RetriesExhausted"]["errorType"] == "Runtime.UnmarshalError"
    assert errors["batcher", "RetriesExhausted"]["errorType"] == "BatchItemFailure"
    for function, subject in (("picky", "events.poison.keep.event"), ("batcher", "events.batch.in")):
        error = errors[function, "PoisonMessage"]
        assert error["errorType"] == "EventDecodeError"
        assert error["errorMessage"].startswith(
            f"cannot decode message on '{subject}': invalid structured CloudEvent: nested too deeply"
        )
    assert alive(service)
    assert "Traceback" not in service.log.text()


async def test_sync_invoke_normalizes_cloudevents_and_answers_a_broken_one_with_400(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    write_handler(
        handlers,
        "mirror",
        """
        def handler(event, context):
            return {"event": event, "ce": context.cloud_event}
        """,
    )
    service = await serve()

    async def invoke(body: bytes, headers: dict[str, str] | None = None) -> tuple[Any, dict[str, str]]:
        reply = await nc.request("eventfn.invoke.mirror", body, timeout=10, headers=headers)
        return json.loads(reply.data), reply.headers or {}

    structured = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "/orders",
        "type": "orders.created",
        "datacontenttype": "application/json",
        "data": {"order": 1},
    }
    result, _ = await invoke(json.dumps(structured).encode(), {"content-type": "application/cloudevents+json"})
    assert result["event"] == {"order": 1}
    assert result["ce"]["id"] == "e-1" and result["ce"]["type"] == "orders.created"
    assert result["ce"]["source"] == "/orders" and result["ce"]["datacontenttype"] == "application/json"

    binary = {"ce-specversion": "1.0", "ce-id": "e-2", "ce-source": "/b", "ce-type": "b.t", "content-type": "text/x"}
    result, _ = await invoke(b"some text", binary)
    assert result["event"] == "some text"
    assert result["ce"]["id"] == "e-2" and result["ce"]["type"] == "b.t" and result["ce"]["datacontenttype"] == "text/x"

    result, _ = await invoke(b'{"plain": true}')
    assert result == {"event": {"plain": True}, "ce": None}

    for broken in (b"{not json", b'{"specversion": "1.0", "data": ' + POISON + b"}", b"[1, 2]"):
        error, headers = await invoke(broken, {"content-type": "application/cloudevents+json"})
        assert headers["Eventfn-Status"] == "400"
        assert headers["Eventfn-Error"] == error["errorType"] == "InvalidRequestContentException"
        assert (
            "cannot decode message on 'eventfn.invoke.mirror': invalid structured CloudEvent" in error["errorMessage"]
        )

    error, headers = await invoke(b"{}", {"Eventfn-Client-Context": "not base64!"})
    assert headers["Eventfn-Status"] == "400" and "Eventfn-Client-Context" in error["errorMessage"]

    error, headers = await invoke(POISON)
    assert headers["Eventfn-Function-Error"] == "Unhandled"
    assert error["errorType"] == "Runtime.UnmarshalError" and "nested too deeply" in error["errorMessage"]

    result, _ = await invoke(b'{"still": "up"}')
    assert result["event"] == {"still": "up"}
    assert alive(service)


async def test_hostile_dlq_records_are_listed_shown_and_refused_without_a_traceback(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, nats_server: NatsServer, probe: Any
) -> None:
    echo_handler(handlers, "victim")
    await serve()
    js = nc.jetstream()
    seen = await probe("probe.victim")
    # Anyone who may publish to eventfn.dlq.> can store anything there.
    deep_record = b'{"timestamp": "t", "requestPayload": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    hostile = [
        deep_record,
        b"\xff\xfe not even text",
        json.dumps(
            {
                "timestamp": "2026-01-01T00:00:00Z\u001b[2J",
                "requestContext": {"condition": "RetriesExhausted", "approximateInvokeCount": 1},
                "responsePayload": {"errorType": "Evil", "errorMessage": "line one\nline two\u001b[31m red"},
                "eventfn": {"subject": "events.x", "stream": "EVENTFN", "stream_seq": 1, "consumer": "a.b"},
            }
        ).encode(),
    ]
    ids = [(await js.publish("eventfn.dlq.victim", data)).seq for data in hostile]
    good = records.failure_record(
        "victim",
        _Stored("eventfn.async.victim", b'{"redriven": true}'),
        "r-1",
        "RetriesExhausted",
        b"{}",
        None,
        cause=None,
        consumer="victim--async",
    )
    good_id = (await js.publish("eventfn.dlq.victim", good)).seq

    code, out, err = await cli(nats_server, "dlq", "ls", "victim")
    assert code == 0, err
    assert "Traceback" not in out + err and "\x1b" not in out
    rows = out.splitlines()[1:]
    assert [int(row.split()[0]) for row in rows] == [*ids, good_id]
    assert "Eventfn.UnreadableRecord: not a failure record eventfn can read: nested too deeply" in rows[0]
    assert "Evil: line one line two" in rows[2]

    for record_id in ids:
        code, out, err = await cli(nats_server, "dlq", "show", str(record_id))
        assert code == 0 and "Traceback" not in out + err and "\x1b" not in out, err

    code, out, err = await cli(nats_server, "dlq", "redrive", "victim")
    assert code == 1 and "Traceback" not in out + err
    assert err.startswith(f"eventfn: error: record {ids[0]} cannot be redriven: not a failure record eventfn can")
    assert "nothing was redriven" in err
    code, out, err = await cli(nats_server, "dlq", "redrive", "victim", "--id", str(ids[2]))
    assert code == 1 and "its mapping 'a.b' is not a consumer name" in err

    code, out, err = await cli(nats_server, "dlq", "redrive", "victim", "--id", str(good_id))
    assert code == 0, err
    assert [json.loads(t) for t in await seen.wait_for(1, timeout=30)] == [{"redriven": True}]


class _Stored:
    """A message as the dispatcher hands it to `records.failure_record`."""

    def __init__(self, subject: str, data: bytes) -> None:
        self.subject, self.data, self.headers = subject, data, None
        self.stream, self.stream_seq, self.delivered, self.timestamp_ns = "EVENTFN", 1, 3, 0


async def test_an_event_whose_dlq_write_fails_stays_queued_until_the_dlq_takes_it(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client, probe: Any
) -> None:
    echo_handler(handlers, "deep", attempts=0)
    service = await serve(config="[recovery]\ndlq_retry_delay = 1\n")  # the DLQ write is tried again after 1 s, not 5
    js = nc.jetstream()
    # A full DLQ that refuses new records: every DLQ write now fails (the stream is there, so the service has
    # nothing to re-create; a deleted one is re-created, see test_broker.py).
    full = (await js.stream_info("EVENTFN_DLQ")).config
    await js.publish("eventfn.dlq.filler", b"{}")
    await js.update_stream(dataclasses.replace(full, max_msgs=1, discard=DiscardPolicy.NEW))
    seen = await probe("probe.deep")
    mark = service.log.mark()
    await js.publish("eventfn.async.deep", POISON)
    await service.log.await_line(
        r"deep: DLQ write for request \S+ failed .*; the event stays queued", start=mark, timeout=30
    )
    # Not acknowledged: the event is still the consumer's to deliver, and the mapping goes on with others.
    info = await js.consumer_info("EVENTFN", "deep--async")
    assert info.num_ack_pending + info.num_pending + info.num_redelivered >= 1
    await js.publish("eventfn.async.deep", b'{"n": 1}')
    assert [json.loads(t) for t in await seen.wait_for(1, timeout=30)] == [{"n": 1}]

    await js.update_stream(full)
    await wait_stats(nc, "deep--async", dead_lettered=1, timeout=30)
    record = await dlq_record(nc, "deep")
    assert record["requestContext"]["condition"] == "RetriesExhausted"
    assert record["responsePayload"]["errorType"] == "Runtime.UnmarshalError"
    assert alive(service)
