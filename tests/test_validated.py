"""A restart does not import again the versions that loaded in the service's previous run (functions scale to zero:
validating them would be the only reason to import them), but a changed or broken version is validated as ever."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from nats.aio.client import Client

from eventfn.service import VALIDATE_BEFORE_READY
from eventfn.testing import Serve, wait_serving, wait_stats, write_handler

HELLO = """
    INITS = 0

    def handler(event, context):
        return {"hello": event.get("name")}
"""


async def invoke(nc: Client, name: str) -> dict[str, object]:
    reply = await nc.request(f"eventfn.invoke.{name}", json.dumps({"name": name}).encode(), timeout=20)
    return json.loads(reply.data)  # type: ignore[no-any-return]


async def test_a_restart_takes_the_versions_that_loaded_before_and_validates_what_changed(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    write_handler(handlers, "same", HELLO)
    write_handler(handlers, "edited", HELLO)
    write_handler(handlers, "broken", "def handler(event, context):\n    return 1\n")
    first = await serve()
    await first.log.await_line(r"function edited loaded \(version \w+, init [\d.]+ ms\)")
    assert "as in an earlier run" not in first.log.service_text()
    await first.astop()

    write_handler(handlers, "edited", HELLO.replace("INITS = 0", "INITS = 1"))  # a new version
    write_handler(handlers, "broken", "def handler(event, context)\n    return 1\n")  # a syntax error now
    second = await serve()
    await second.log.await_line(r"function same loaded \(version \w+, init [\d.]+ ms, as in an earlier run\)")
    await second.log.await_line(r"function edited loaded \(version \w+, init [\d.]+ ms\)$")
    await second.log.await_line(r"UserCodeSyntaxError")
    assert await invoke(nc, "same") == {"hello": "same"}, "its first invocation imports it (a cold start)"
    assert await invoke(nc, "edited") == {"hello": "edited"}
    await second.astop()

    # The broken version is not remembered as valid; once fixed, it is validated again, then remembered.
    write_handler(handlers, "broken", "def handler(event, context):\n    return 2\n")
    third = await serve()
    await third.log.await_line(r"function broken loaded \(version \w+, init [\d.]+ ms\)$")
    await third.log.await_line(r"function edited loaded \(version \w+, init [\d.]+ ms, as in an earlier run\)")
    assert await invoke(nc, "broken") == 2


async def test_past_the_first_functions_a_start_goes_live_first_and_validates_after(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    """A service with more new functions than it validates before it is ready (`VALIDATE_BEFORE_READY`) says it is
    ready, then validates the rest; one of those that fails to load is taken back with its error, as at start."""
    for n in range(VALIDATE_BEFORE_READY):
        write_handler(handlers, f"f{n:03d}", HELLO)
    write_handler(handlers, "later_ok", HELLO)
    write_handler(handlers, "later_broken", "def handler(event, context)\n    return 1\n")  # a syntax error
    service = await serve()
    for name in ("later_broken", "later_ok"):  # past the first ones: live at once, validated after
        await service.log.await_line(rf"function {name} loaded \(version \w+, init 0.0 ms, validated after start-up\)")
    await service.log.await_line(r"validated the 2 function\(s\) .* unvalidated; failed: later_broken")
    first = re.search(r"function f000 loaded \(version \w+, init [\d.]+ ms\)$", service.log.text(), re.MULTILINE)
    assert first is not None, "the first ones are validated before the service is ready"
    assert await invoke(nc, "later_ok") == {"hello": "later_ok"}
    reply = await nc.request("eventfn.invoke.later_broken", b"{}", timeout=20)
    assert json.loads(reply.data)["errorType"] == "Runtime.UserCodeSyntaxError"
    functions = json.loads((await nc.request("eventfn.api.functions", b"", timeout=20)).data)
    states = {f["name"]: f["state"] for f in functions}
    assert states["later_broken"] == "Failed" and states["later_ok"] == "Active"


async def test_stored_events_of_a_function_validated_after_start_up_wait_for_its_validation(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    """Past the first functions, a version goes live before it is validated; its stored events must not meet it
    meanwhile: one that fails to load would fail them (here straight to the DLQ, no retries) where a version that
    fails at start-up leaves them waiting for a fix."""
    settings = "# /// eventfn\n# retry = { max_attempts = 0 }\n# ///\n"
    for n in range(VALIDATE_BEFORE_READY):
        write_handler(handlers, f"f{n:03d}", HELLO)
    write_handler(handlers, "later", settings + "def handler(event, context):\n    return event\n")
    first = await serve()
    await first.log.await_line(r"validated the 1 function\(s\) that went live at start-up unvalidated$")
    await nc.jetstream().publish("eventfn.async.later", b'{"n": 0}')
    await wait_stats(nc, "later--async", processed=1)  # once validated, its events run
    await first.astop()

    write_handler(handlers, "later", settings + "def handler(event, context)\n    return event\n")  # broken now
    await nc.jetstream().publish("eventfn.async.later", b'{"n": 1}')
    second = await serve()
    await second.log.await_line(r"function later loaded \(version \w+, init 0.0 ms, validated after start-up\)")
    await second.log.await_line(r"validated the 1 function\(s\) .* unvalidated; failed: later")
    write_handler(handlers, "later", settings + "def handler(event, context):\n    return event\n")  # fixed
    await wait_serving(nc, "later")
    stats = await wait_stats(nc, "later--async", processed=1)
    assert stats["dead_lettered"] == 0 and stats["failed"] == 0, stats
