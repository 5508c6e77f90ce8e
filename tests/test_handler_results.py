"""What a caller and the log see of a handler: its result, its errors, its output (issue 8, section 1).

The encoding rules are checked as a pure function against what Lambda's Python runtime does (awslambdaric's
marshaller: simplejson with Decimal support, whose results are written out below), then end to end against a
real `eventfn serve` on a real nats-server, in both isolation modes where the behaviour applies.
"""

from __future__ import annotations

import collections
import datetime
import enum
import json
import math
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from eventfn.invoke import marshal
from eventfn.invoke.invocation import Invocation
from eventfn.testing import PROBE_MODULE, NatsServer, Serve, function_info, wait_stats, wait_until, write_handler
from tests.conftest import running_pool

ERROR_KEYS = {"errorMessage", "errorType", "requestId", "stackTrace"}
ISOLATIONS = ["process", "inprocess"]


async def invoke(nc: Client, name: str, payload: object = None) -> tuple[Any, dict[str, str]]:
    reply = await nc.request(f"eventfn.invoke.{name}", json.dumps(payload or {}).encode(), timeout=15)
    return json.loads(reply.data), dict(reply.headers or {})


# -- results: exactly what Lambda's runtime encodes, as it encodes it --------------------------------------------

Point = collections.namedtuple("Point", "x y")


class Colour(enum.Enum):
    RED = 1


class Size(enum.IntEnum):
    LARGE = 3


class Word(str, enum.Enum):  # noqa: UP042 (the mixin whose str() is "Word.HELLO", not its value)
    HELLO = "hello"


# Each value with the JSON Lambda's runtime answers, or the message of its Runtime.MarshalError.
LAMBDA_ENCODES = [
    (Decimal("1.50"), "1.50"),  # a number, written as str() gives it (DynamoDB's numbers keep their digits)
    (Decimal("1E+2"), "1E+2"),
    (Decimal("NaN"), "NaN"),
    (Decimal("-Infinity"), "-Infinity"),
    ((1, "two"), '[1,"two"]'),
    (Point(1, 2), '{"x":1,"y":2}'),  # a namedtuple is an object
    ({1: "a", 2.5: "b", False: "c", None: "d"}, '{"1":"a","2.5":"b","false":"c","null":"d"}'),
    ([float("nan"), float("inf"), float("-inf")], "[NaN,Infinity,-Infinity]"),  # as Python's json writes them
    ({"b": b"utf-8 bytes"}, '{"b":"utf-8 bytes"}'),
    (Size.LARGE, "3"),
    (Word.HELLO, '"hello"'),
    ("\ud800", '"\\ud800"'),  # a lone surrogate, escaped
    (10**30, "1000000000000000000000000000000"),
]
LAMBDA_REFUSES = [
    (datetime.datetime(2024, 1, 1), "Object of type datetime is not JSON serializable"),
    (datetime.date(2024, 1, 1), "Object of type date is not JSON serializable"),
    ({1, 2}, "Object of type set is not JSON serializable"),
    (uuid.UUID(int=1), "Object of type UUID is not JSON serializable"),
    (Colour.RED, "Object of type Colour is not JSON serializable"),
    (object(), "Object of type object is not JSON serializable"),
    (bytearray(b"x"), "Object of type bytearray is not JSON serializable"),
    ({(1, 2): "tuple key"}, "keys must be str, int, float, bool or None, not tuple"),
    ([b"\xff"], "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
]


@pytest.mark.parametrize(("value", "encoded"), LAMBDA_ENCODES, ids=lambda v: repr(v)[:30])
def test_results_are_encoded_as_lambdas_runtime_encodes_them(value: object, encoded: str) -> None:
    assert marshal.encode(value) == encoded.encode()


@pytest.mark.parametrize(("value", "message"), LAMBDA_REFUSES, ids=lambda v: repr(v)[:30])
def test_results_lambda_cannot_encode_are_refused_with_its_message(value: object, message: str) -> None:
    with pytest.raises(Exception) as info:
        marshal.encode(value)
    assert str(info.value) == message


def test_a_reference_cycle_is_refused_as_lambda_refuses_it() -> None:
    cycle: list[object] = []
    cycle.append({"again": cycle})
    with pytest.raises(ValueError) as info:
        marshal.encode(cycle)
    assert str(info.value) == "Circular reference detected"


def test_a_bytes_result_is_the_response_body_itself() -> None:
    assert marshal.encode(b"\x00raw, not JSON") == b"\x00raw, not JSON"


# What Python's json module and Lambda's encoder agree on: scalars, lists, tuples, str/int/float/bool/None keys.
_keys = st.one_of(st.text(max_size=5), st.integers(), st.floats(), st.booleans(), st.none())
_json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple), st.dictionaries(_keys, inner, max_size=4)
    ),
    max_leaves=20,
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@given(_json_like)
def test_any_value_json_can_encode_reads_back_as_json_encodes_it(value: object) -> None:
    assert _same(json.loads(marshal.encode(value)), json.loads(json.dumps(value)))


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_a_decimal_is_written_digit_for_digit(value: Decimal) -> None:
    assert marshal.encode({"n": value}) == b'{"n":' + str(value).encode() + b"}"


#: The functions the shared service runs: each test's own, one per isolation mode where it applies.
def _shared_functions() -> dict[str, str]:
    functions = {"huge": HUGE_LINE}
    for isolation in ISOLATIONS:
        functions[f"when_{isolation}"] = WHEN.format(isolation=isolation)
        functions[f"broken_{isolation}"] = BROKEN.format(isolation=isolation)
        for name, kw, aw in [("plain", "", ""), ("coroutine", "async ", "await ")]:
            functions[f"{name}_{isolation}"] = RAISES.format(isolation=isolation, kw=kw, aw=aw)
        functions[f"loud_{isolation}"] = LOUD.format(isolation=isolation, fds=isolation == "process")
        functions[f"chatty_{isolation}"] = PRINTS.format(isolation=isolation)
    return functions


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, Serve]]:
    """One nats-server and one `eventfn serve` running every function of the tests that only call their own
    function and read what it answered and logged (a start costs about a second each)."""
    root = tmp_path_factory.mktemp("results")
    handlers = root / "handlers"
    handlers.mkdir()
    (handlers / "_probe.py").write_text(PROBE_MODULE)
    for name, source in _shared_functions().items():
        write_handler(handlers, name, source)
    with NatsServer(root / "nats") as server, Serve(handlers, server.url, root / "data") as service:
        yield server, service


@pytest.fixture
def service(shared: tuple[NatsServer, Serve]) -> Serve:
    return shared[1]


@pytest.fixture
async def client(shared: tuple[NatsServer, Serve]) -> AsyncIterator[Client]:
    """A client of the shared service's nats-server."""
    nc = await nats.connect(shared[0].url)
    yield nc
    await nc.close()


def service_handlers(service: Serve) -> Path:
    """The handler directory the shared service runs."""
    return Path(service.args[service.args.index("--handlers") + 1])


WHEN = """
    # /// eventfn
    # isolation = "{isolation}"
    # ///
    import datetime
    from decimal import Decimal

    def handler(event, context):
        if event.get("decimal"):
            return {{"price": Decimal("19.90")}}
        return {{"at": datetime.datetime(2024, 1, 1)}}
"""


@pytest.mark.e2e
@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_unencodable_result_is_lambdas_marshal_error(client: Client, isolation: str) -> None:
    error, headers = await invoke(client, f"when_{isolation}")
    assert error == {
        "errorMessage": "Unable to marshal response: Object of type datetime is not JSON serializable",
        "errorType": "Runtime.MarshalError",
        "requestId": headers["Eventfn-Request-Id"],
        "stackTrace": [],
    }
    assert headers["Eventfn-Function-Error"] == "Unhandled"
    reply = await client.request(f"eventfn.invoke.when_{isolation}", b'{"decimal": true}', timeout=15)
    assert reply.data == b'{"price":19.90}'


# -- errors: Lambda's types and stack traces ---------------------------------------------------------------------

BROKEN = """
    # /// eventfn
    # isolation = "{isolation}"
    # ///
    def handler(event, context)
        return 1
"""


@pytest.mark.e2e
@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_syntax_error_is_user_code_syntax_error_for_every_caller(
    service: Serve, client: Client, isolation: str
) -> None:
    name = f"broken_{isolation}"
    path = service_handlers(service) / f"{name}.py"
    logged = (await service.log.await_line(rf"function '{name}' failed to load at (\S+): (\S+): ")).groups()
    assert logged == (f"{path}:4", "Runtime.UserCodeSyntaxError")
    error, headers = await invoke(client, name)
    assert error == {
        "errorMessage": f"Syntax error in module '{name}': expected ':' ({name}.py, line 4)",
        "errorType": "Runtime.UserCodeSyntaxError",
        "requestId": headers["Eventfn-Request-Id"],
        "stackTrace": [f'  File "{path}" Line 4\n    def handler(event, context)\n'],  # Lambda's shape
    }
    assert headers["Eventfn-Function-Error"] == "Unhandled"
    [info] = [
        f
        for f in json.loads((await client.request("eventfn.api.functions", b"", timeout=10)).data)
        if f["name"] == name
    ]
    assert f"Runtime.UserCodeSyntaxError: Syntax error in module '{name}'" in info["last_error"]


@pytest.mark.e2e
async def test_syntax_error_met_by_a_cold_start_is_user_code_syntax_error_in_the_dlq(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    settings = "# /// eventfn\n# min_warm = 0\n# idle_timeout = 1\n# retry = { max_attempts = 0 }\n# ///\n"
    write_handler(handlers, "later", settings + "def handler(event, context):\n    return 1\n")
    service = await serve()
    # No warm worker (min_warm 0: the one that validated the version stopped): the next invocation of the version
    # still serving starts one, which reads the file.
    assert (await function_info(nc, "later"))["workers"] == 0  # type: ignore[index]
    mark = service.log.mark()
    write_handler(handlers, "later", settings + "def handler(event, context)\n    return 1\n")
    info = await wait_until(lambda: function_info(nc, "later"), lambda i: i is not None and i["state"] == "Failed")
    assert "Runtime.UserCodeSyntaxError" in info["last_error"] and info["serving_version"]  # the old one serves
    js = nc.jetstream()
    await js.publish("eventfn.async.later", b'{"n": 1}')
    await wait_stats(nc, "later--async", dead_lettered=1)
    record = json.loads((await js.get_last_msg("EVENTFN_DLQ", "eventfn.dlq.later")).data)
    request = record["requestContext"]["requestId"]
    response = record["responsePayload"]
    assert set(response) == ERROR_KEYS
    assert response["errorType"] == "Runtime.UserCodeSyntaxError"
    assert response["requestId"] == request
    assert record["eventfn"]["history"][-1]["errorType"] == "Runtime.UserCodeSyntaxError"
    await service.log.await_line(
        rf"REPORT RequestId: {request}\t.*Status: error Runtime\.UserCodeSyntaxError", start=mark
    )


RAISES = """
    # /// eventfn
    # isolation = "{isolation}"
    # ///
    {kw}def handler(event, context):
        return {aw}helper(event)


    {kw}def helper(event):
        raise ValueError("bad order")
"""


@pytest.mark.e2e
@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_stack_trace_shows_the_handlers_frames_only(service: Serve, client: Client, isolation: str) -> None:
    for name, aw in [(f"plain_{isolation}", ""), (f"coroutine_{isolation}", "await ")]:
        path = service_handlers(service) / f"{name}.py"
        error, headers = await invoke(client, name)
        assert error == {
            "errorMessage": "bad order",
            "errorType": "ValueError",
            "requestId": headers["Eventfn-Request-Id"],
            "stackTrace": [  # as Lambda formats them: no eventfn, asyncio or thread-pool frames, no ^^^ markers
                f'  File "{path}", line 5, in handler\n    return {aw}helper(event)\n',
                f'  File "{path}", line 9, in helper\n    raise ValueError("bad order")\n',
            ],
        }


# -- output: capped per invocation, logged between START and END ------------------------------------------------

LOUD = """
    # /// eventfn
    # isolation = "{isolation}"
    # max_log_bytes = 10000
    # ///
    import logging, os

    print("i" * 29999)  # init: 30,000 bytes with the newline

    def handler(event, context):
        if event.get("loud"):
            for _ in range(200):
                print("x" * 999)  # 200,000 bytes
            if {fds}:  # C code and child processes write to the descriptors
                os.write(1, b"y" * 49999 + b"\\n")
                os.write(2, b"z" * 49999 + b"\\n")
        elif event.get("logs"):
            for n in range(200):
                logging.getLogger("loud").warning("record %d %s", n, "w" * 990)
        else:
            print("a small line")
        return "done"
"""


def _lines_of(service: Serve, name: str, request_id: str) -> list[str]:
    return [line for line in service.log.lines if line.startswith(f"[{name}] ") and f"\t{request_id}\t" in line]


@pytest.mark.e2e
@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_output_is_capped_per_invocation_with_one_marker_line(
    service: Serve, client: Client, isolation: str
) -> None:
    process = isolation == "process"  # only a worker process can capture what is written to fd 1 and 2
    name = f"loud_{isolation}"
    marker = (
        rf"\[{name}\] \S+\t{{}}\teventfn: output truncated: (\d+) bytes dropped after the first (\d+) \(.*max_log_bytes"
    )
    assert (await service.log.await_line(marker.format("-"))).groups() == ("20001", "9999"), (
        "the init phase is capped too"
    )

    _, headers = await invoke(client, name, {"loud": True})
    loud = headers["Eventfn-Request-Id"]
    dropped, kept = (await service.log.await_line(marker.format(loud))).groups()
    assert (int(dropped), int(kept)) == (190_000 + 100_000 * process, 10_000)
    lines = _lines_of(service, name, loud)
    assert len(lines) == 11, "ten lines of output, then the one marker"
    assert all(line.endswith("\t" + "x" * 999) for line in lines[:10])

    mark = service.log.mark()  # the service is shared: count this invocation's records only
    _, headers = await invoke(client, name, {"logs": True})
    logs = headers["Eventfn-Request-Id"]
    await service.log.await_line(marker.format(logs), start=mark)
    assert 5 <= sum("record" in line for line in service.log.lines[mark:] if "w" * 990 in line) <= 10

    _, headers = await invoke(client, name)
    quiet = headers["Eventfn-Request-Id"]
    await service.log.await_line(rf"END RequestId: {quiet}")
    assert [line.split("\t", 2)[2] for line in _lines_of(service, name, quiet)] == ["a small line"], "the budget resets"


PRINTS = """
    # /// eventfn
    # isolation = "{isolation}"
    # ///
    def handler(event, context):
        print("printed by", context.aws_request_id)
        return "ok"
"""


@pytest.mark.e2e
@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_a_sync_invokes_print_is_logged_between_its_start_and_end(
    service: Serve, client: Client, isolation: str
) -> None:
    name = f"chatty_{isolation}"
    for _ in range(3):
        _, headers = await invoke(client, name)
        request = re.escape(headers["Eventfn-Request-Id"])
        await service.log.await_line(rf"END RequestId: {request}")
        lines = service.log.lines
        patterns = (
            rf"START RequestId: {request} ",
            rf"^\[{name}\] .*\tprinted by {request}$",
            rf"END RequestId: {request}",
        )
        where = [next((i for i, line in enumerate(lines) if re.search(p, line)), -1) for p in patterns]
        assert -1 not in where and where == sorted(where), "\n".join(lines[-10:])


HUGE_LINE = """
    # memory = 128 (the default): the handler's own 40 MB line fits; copies of it made by eventfn would not
    def handler(event, context):
        print("y" * 40_000_000)
        return "printed"
"""


@pytest.mark.e2e
async def test_one_huge_print_is_capped_without_costing_the_handler_its_memory(service: Serve, client: Client) -> None:
    result, headers = await invoke(client, "huge")
    assert result == "printed", result
    request = re.escape(headers["Eventfn-Request-Id"])
    await service.log.await_line(rf"\t{request}\teventfn: output truncated: \d+ bytes dropped")
    await service.log.await_line(rf"REPORT RequestId: {request}\t.*Status: ok")


async def test_what_c_code_and_child_processes_write_is_tagged_with_the_request(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code = """
        import os, subprocess

        def handler(event, context):
            os.write(2, b"written to fd 2\\n")
            subprocess.run(["sh", "-c", "echo from a child; echo from its stderr >&2"], check=True)
            return "ok"
    """
    async with running_pool(tmp_path, code, timeout=10) as pool:
        outcome = (await pool.execute(Invocation(request_id="req-child", payload=b"{}"))).outcome
    assert outcome.ok, outcome.payload
    err = capfd.readouterr().err
    for text in ("written to fd 2", "from a child", "from its stderr"):
        assert re.search(rf"^\[fn\] \S+\treq-child\t{text}$", err, re.MULTILINE), err


async def test_a_child_that_keeps_writing_does_not_hold_up_the_invocation(tmp_path: Path) -> None:
    """Output is taken in at the end of an invocation, but a process the handler left running may write
    forever: the invocation still ends when its handler returns (the child's output counts after it)."""
    code = """
        import subprocess

        def handler(event, context):
            for _ in range(3):  # enough writers that the pipe is never empty for long
                subprocess.Popen(["yes", "chatter"])
            return "ok"
    """
    async with running_pool(tmp_path, code) as pool:  # retired on the way out: ends the worker and what it started
        first = (await pool.execute(Invocation(request_id="req-chatter-1", payload=b"{}"))).outcome
        # The worker is still usable, the child still writing.
        second = (await pool.execute(Invocation(request_id="req-chatter-2", payload=b"{}"))).outcome
    assert first.ok and first.payload == b'"ok"', first.payload
    assert second.ok and second.payload == b'"ok"', second.payload
