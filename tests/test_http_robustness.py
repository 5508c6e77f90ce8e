"""The HTTP front under careless and hostile clients and handlers, against one real `eventfn serve`: floods of
requests and of large bodies, handlers that answer nonsense, clients that leave mid-request.

Handlers that must be seen running touch a file named for their request in a folder of the test's; the gated one
then waits for the test to open its gate, so that what holds at once is counted, not timed.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import http.client
import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import nats
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


SLOW = """
    # /// eventfn
    # concurrency = 2
    # ///
    import time

    def handler(event, context):
        time.sleep(0.3)
        return "slow"
"""


class Svc:
    def __init__(self, serve: Serve, gate: Path, buckets: Path | None = None) -> None:
        self.serve = serve
        self.gate = gate
        #: The buckets root, with bucket `files`.
        self.buckets = buckets or gate
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
    write_handler(handlers, "slow", SLOW)
    buckets = root / "buckets"
    (buckets / "files").mkdir(parents=True)
    config = root / "eventfn.toml"
    config.write_text(f'[http]\nmax_body = {MAX_BODY}\n\n[buckets]\nroot = "{buckets}"\n')
    with Serve(handlers, None, root / "data", extra_args=["--config", str(config)]) as serve:
        yield Svc(serve, gate, buckets)


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


def test_a_put_cut_by_sigkill_leaves_the_old_object_and_its_staged_body_is_removed_after_restart(
    tmp_path: Path,
) -> None:
    root = tmp_path / "buckets"
    (root / "files").mkdir(parents=True)
    (root / "files" / "kept.txt").write_bytes(b"the old object")
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    config = tmp_path / "eventfn.toml"
    config.write_text(f'[buckets]\nroot = "{root}"\n')
    args = ["--config", str(config)]
    staging = root / ".eventfn-uploads"
    serve = Serve(handlers, None, tmp_path / "data", extra_args=args).start()
    try:
        url = urlsplit(serve.http_url)
        with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
            sock.sendall(b"PUT /files/kept.txt HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 30000000\r\n\r\n")
            sock.sendall(b"n" * 5_000_000)
            for _ in range(600):  # until the body is being staged
                if any(p.stat().st_size for p in staging.glob("*.tmp")):
                    break
                threading.Event().wait(0.05)
            serve.kill()
    finally:
        serve.stop()
    assert (root / "files" / "kept.txt").read_bytes() == b"the old object"
    assert [p.name for p in staging.glob("*.tmp")], "the cut body is still staged"
    with Serve(handlers, None, tmp_path / "data", extra_args=args) as again:
        status, _, _ = Svc(again, tmp_path).request("PUT", "/files/new.txt", b"a new object")
        assert status == 200
    assert (root / "files" / "kept.txt").read_bytes() == b"the old object"
    assert (root / "files" / "new.txt").read_bytes() == b"a new object"
    assert not list(staging.glob("*.tmp")), "the body staged by the killed service is gone"


def test_a_function_added_while_jetstream_stalls_gets_its_url_once_provisioning_catches_up(tmp_path: Path) -> None:
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    with Serve(handlers, None, tmp_path / "data") as serve:
        assert serve.process is not None
        nats = next(
            int(pid)
            for pid in (Path(f"/proc/{serve.process.pid}/task/{serve.process.pid}/children").read_text().split())
            if b"nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
        )
        mark = serve.log.mark()
        os.kill(nats, signal.SIGSTOP)  # JetStream answers nothing: the reload's provisioning fails part-way
        try:
            write_handler(handlers, "late", "def handler(event, context):\n    return 'here'\n")
            serve.log.wait_for(r"function late loaded", start=mark, timeout=30)
            serve.log.wait_for(r"reload failed", start=mark, timeout=60)
        finally:
            os.kill(nats, signal.SIGCONT)
        serve.log.wait_for(r"provisioning done \(it had failed part-way\)", start=mark, timeout=60)
        status, _, body = Svc(serve, tmp_path).request("GET", "/fn/late/")
        assert (status, body) == (200, b'"here"')


def test_a_get_of_a_file_another_process_is_appending_to_has_the_etag_of_the_bytes_it_serves(svc: Svc) -> None:
    # A client that checks downloads against the ETag (rclone, s3cmd, mc do) must not see a mismatch: the body is the
    # file's first st_size bytes, and so must its MD5 be.
    path = svc.buckets / "files" / "growing.log"
    path.write_bytes(b"")
    done = threading.Event()

    def append() -> None:
        with path.open("ab") as file:
            for i in range(4000):  # a few seconds at most
                if done.is_set():
                    return
                file.write(f"{i:06d} ".encode() * 2000)
                file.flush()

    writer = threading.Thread(target=append)
    writer.start()
    try:
        served = []
        for _ in range(15):
            status, headers, body = svc.request("GET", "/files/growing.log")
            assert status == 200
            served.append((headers["etag"].strip('"'), hashlib.md5(body).hexdigest(), len(body)))
    finally:
        done.set()
        writer.join(30)
    assert len({size for _, _, size in served}) > 1, "the file grew while it was read"
    assert [(etag, md5) for etag, md5, _ in served if etag != md5] == []


def test_a_flood_of_requests_at_a_function_of_concurrency_2_is_answered_and_nats_invokes_go_on(svc: Svc) -> None:
    # 1500 clients at once, more than [http] max_connections (1000): each gets 200, 429 (the function's two slots
    # are taken) or 503 (too many connections), none hangs; meanwhile invokes over NATS are answered, and the
    # service's memory does not grow with the flood.
    assert svc.serve.process is not None
    status_file = Path(f"/proc/{svc.serve.process.pid}/status")

    def rss_mb() -> float:
        line = next(line for line in status_file.read_text().splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    async def one(counts: collections.Counter[str]) -> None:
        reader, writer = await asyncio.open_connection(svc.url.hostname, svc.url.port)
        writer.write(b"GET /fn/slow/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        counts[answer.split(b" ", 2)[1].decode() if answer else "nothing"] += 1

    async def flood() -> tuple[collections.Counter[str], list[bytes], float]:
        counts: collections.Counter[str] = collections.Counter()
        peak = rss_mb()
        nc = await nats.connect(**svc.serve.connect_options("invoker"))
        try:
            tasks = [asyncio.create_task(one(counts)) for _ in range(1500)]
            answers = []
            while not all(task.done() for task in tasks):
                answers.append((await nc.request("eventfn.invoke.gate", b"{}", timeout=30)).data)
                peak = max(peak, rss_mb())
                await asyncio.sleep(0.05)
            await asyncio.gather(*tasks)
        finally:
            await nc.close()
        return counts, answers, peak

    (svc.gate / "open").touch()  # the gated function answers at once
    before = rss_mb()
    counts, answers, peak = asyncio.run(flood())
    assert sum(counts.values()) == 1500 and set(counts) <= {"200", "429", "503"}, counts
    assert counts["429"] and counts["200"] >= 2, counts
    assert answers and set(answers) == {b'{"ok":true}'}, "NATS invokes during the flood were answered"
    assert peak - before < 100, f"the service grew from {before:.0f} MB to {peak:.0f} MB under the flood"
    status, _, body = svc.request("GET", "/fn/slow/")
    assert (status, body) == (200, b'"slow"')
