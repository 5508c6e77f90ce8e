"""A restart does not import again the versions that loaded in the service's previous run (functions scale to zero:
validating them would be the only reason to import them), but a changed or broken version is validated as ever."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from nats.aio.client import Client

from eventfn.testing import Serve, write_handler

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
