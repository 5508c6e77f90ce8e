"""The HTTP front under careless and hostile clients and handlers, against one real `eventfn serve`: floods of
requests and of large bodies, handlers that answer nonsense, clients that leave mid-request.

Handlers that must be seen running touch a file named for their request in a folder of the test's; the gated one
then waits for the test to open its gate, so that what holds at once is counted, not timed.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from eventfn.fronts.http.server import BUFFERED_BODIES
from eventfn.testing import Serve, write_handler

pytestmark = pytest.mark.e2e

MAX_BODY = 256 * 1024

GATE = """
    # /// eventfn
    # timeout = 60
    # concurrency = 100
    # [environment]
    # GATE = "GATE_DIR"
    # ///
    import os, time

    def handler(event, context):
        gate = os.environ["GATE"]
        open(os.path.join(gate, "started-" + context.aws_request_id), "w").close()
        for _ in range(1200):  # at most a minute
            if os.path.exists(os.path.join(gate, "open")):
                break
            time.sleep(0.05)
        return {"ok": True}
"""


class Svc:
    def __init__(self, serve: Serve, gate: Path) -> None:
        self.serve = serve
        self.gate = gate
        self.url = urlsplit(serve.http_url)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection: status, headers (lower-cased names), body."""
        conn = http.client.HTTPConnection(self.url.hostname or "", self.url.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Svc]:
    root = tmp_path_factory.mktemp("robust")
    handlers = root / "handlers"
    handlers.mkdir()
    gate = root / "gate"
    gate.mkdir()
    write_handler(handlers, "gate", GATE.replace("GATE_DIR", str(gate)))
    config = root / "eventfn.toml"
    config.write_text(f"[http]\nmax_body = {MAX_BODY}\n")
    with Serve(handlers, None, root / "data", extra_args=["--config", str(config)]) as serve:
        yield Svc(serve, gate)


def test_a_flood_of_large_bodies_is_refused_past_the_budget_not_buffered(svc: Svc) -> None:
    # 40 bodies of the largest size at once, to a function that could run them all: the server holds at most
    # BUFFERED_BODIES of them (each for as long as its invocation runs); the rest get a retryable 429 unread.
    total = 40
    answers: list[tuple[int, dict[str, str], bytes]] = []
    lock = threading.Lock()

    def post() -> None:
        answer = svc.request("POST", "/fn/gate/", b"b" * MAX_BODY, {"Content-Type": "application/octet-stream"})
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=post) for _ in range(total)]
    for thread in threads:
        thread.start()
    try:
        # Every request is either running (its file made) or answered: then nothing else can start.
        for _ in range(600):
            started = len(list(svc.gate.glob("started-*")))
            with lock:
                done = len(answers)
            if started + done >= total:
                break
            threading.Event().wait(0.05)
        with lock:
            refused = list(answers)
        assert started <= BUFFERED_BODIES, f"{started} bodies held at once; the budget is {BUFFERED_BODIES}"
        assert len(refused) == total - started
        for status, headers, body in refused:
            assert (status, headers.get("retry-after")) == (429, "1"), body
            assert b"request bodies" in body
    finally:
        (svc.gate / "open").touch()
        for thread in threads:
            thread.join(60)
    assert sorted(status for status, _, _ in answers).count(200) == started
    status, _, body = svc.request("POST", "/fn/gate/", b"after" * 10, {"Content-Type": "text/plain"})
    assert (status, json.loads(body)) == (200, {"ok": True}), "the budget was given back"
