"""Webhooks end to end: signed requests to async routes of one `eventfn serve` are stored on JetStream, answered
202 with the event id, and processed with the function's retry policy and DLQ; unsigned or wrongly signed ones are
refused with nothing stored (counted on the stream itself), and a store that fails is a 503, never a 202.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import http.client
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import nats
import pytest

from eventfn import subjects
from eventfn.broker import auth
from eventfn.fronts.http.signatures import Guard
from eventfn.testing import NatsServer, Serve, write_handler
from eventfn.web import Request

pytestmark = pytest.mark.e2e

SECRETS = {
    "HOOK_SECRET": "generic-hmac-secret",
    "GH_SECRET": "github-webhook-secret",
    "STRIPE_SECRET": "whsec_stripe-test-secret",
    "HOOK_TOKEN": "bearer-hook-token",
}

HOOK = """
    # /// eventfn
    # timeout = 5
    # [[triggers]]
    # type = "http"
    # path = "/hooks/generic"
    # methods = ["POST"]
    # mode = "async"
    # auth = "hmac"
    # secret = "env:HOOK_SECRET"
    # signature_header = "X-Signature"
    # signature_prefix = "v1="
    # [[triggers]]
    # type = "http"
    # path = "/hooks/github"
    # methods = ["POST"]
    # mode = "async"
    # auth = "github"
    # secret = "env:GH_SECRET"
    # [[triggers]]
    # type = "http"
    # path = "/hooks/stripe"
    # methods = ["POST"]
    # mode = "async"
    # auth = "stripe"
    # secret = "env:STRIPE_SECRET"
    # [[triggers]]
    # type = "http"
    # path = "/hooks/bearer"
    # methods = ["POST"]
    # mode = "async"
    # auth = "bearer"
    # secret = "env:HOOK_TOKEN"
    # [[triggers]]
    # type = "http"
    # path = "/hooks/sync"
    # methods = ["POST"]
    # auth = "github"
    # secret = "env:GH_SECRET"
    # ///
    def handler(event, context):
        print(f"hook got {event['routeKey']} {context.aws_request_id} {event['requestContext']['requestId']} "
              f"body={event.get('body')}")
        return {"ok": True}
"""

FAILING = """
    # /// eventfn
    # triggers = [{type = "http", path = "/hooks/fail", mode = "async", auth = "none"}]
    # [retry]
    # max_attempts = 0
    # ///
    def handler(event, context):
        raise RuntimeError("this webhook handler fails")
"""


def hmac_hex(secret: str, data: bytes) -> str:
    return hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


def stripe_header(body: bytes, *, at: float | None = None, secret: str = SECRETS["STRIPE_SECRET"]) -> str:
    stamp = str(int(time.time() if at is None else at))
    return f"t={stamp},v1={hmac_hex(secret, stamp.encode() + b'.' + body)},v0=ignored"


Answer = tuple[int, dict[str, str], bytes]


class Svc:
    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.url = urlsplit(serve.http_url)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> Answer:
        conn = http.client.HTTPConnection(self.url.hostname or "", self.url.port, timeout=30)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    async def apost(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> Answer:
        return await anyio.to_thread.run_sync(functools.partial(self.post, path, body, headers))

    async def stored(self, function: str) -> int:
        """How many events the stream holds on `function`'s async queue."""
        nc = await nats.connect(**self.serve.connect_options(auth.SERVICE))  # admin may not read stream info
        try:
            info = await nc.jetstream().stream_info(subjects.EVENTS_STREAM, subjects_filter="eventfn.async.>")
            return int((info.state.subjects or {}).get(subjects.ASYNC_PREFIX + function, 0))
        finally:
            await nc.close()


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Svc]:
    root = tmp_path_factory.mktemp("webhooks")
    handlers = root / "handlers"
    handlers.mkdir()
    write_handler(handlers, "hook", HOOK)
    write_handler(handlers, "failing", FAILING)
    with Serve(handlers, None, root / "data", env=SECRETS) as serve:
        yield Svc(serve)


async def test_a_signed_webhook_is_answered_202_with_its_event_id_and_processed(svc: Svc) -> None:
    body = b'{"action": "opened"}'
    mark = svc.serve.log.mark()
    status, headers, answer = await svc.apost(
        "/hooks/generic", body, {"X-Signature": "v1=" + hmac_hex(SECRETS["HOOK_SECRET"], body)}
    )
    assert status == 202, answer
    event_id = json.loads(answer)["eventId"]
    assert headers["x-amzn-requestid"] == event_id
    # The handler's request id is the event id, and the event is the request's payload v2.0 event.
    await svc.serve.log.await_line(
        rf'hook got POST /hooks/generic {event_id} {event_id} body={{"action": "opened"}}', start=mark, timeout=30
    )
    for secret in SECRETS.values():
        assert secret not in svc.serve.log.text()


async def test_github_stripe_and_bearer_webhooks_verify(svc: Svc) -> None:
    body = b'{"zen": "Keep it logically awesome."}'
    github = {"X-Hub-Signature-256": "sha256=" + hmac_hex(SECRETS["GH_SECRET"], body), "X-GitHub-Event": "ping"}
    mark = svc.serve.log.mark()
    ids = []
    for path, headers in [
        ("/hooks/github", github),
        ("/hooks/stripe", {"Stripe-Signature": stripe_header(body)}),
        ("/hooks/bearer", {"Authorization": f"Bearer {SECRETS['HOOK_TOKEN']}"}),
    ]:
        status, _, answer = await svc.apost(path, body, headers)
        assert status == 202, (path, answer)
        ids.append(json.loads(answer)["eventId"])
    for path, event_id in zip(["github", "stripe", "bearer"], ids, strict=True):
        await svc.serve.log.await_line(rf"hook got POST /hooks/{path} {event_id} ", start=mark, timeout=30)
    # A sync route checks the same signatures, and answers with the result.
    status, _, answer = await svc.apost("/hooks/sync", body, github)
    assert (status, json.loads(answer)) == (200, {"ok": True})


async def test_missing_or_wrong_signatures_are_refused_and_nothing_is_stored(svc: Svc) -> None:
    body = b'{"amount": 100}'
    before = await svc.stored("hook")
    wrong_hmac = hmac_hex("not-the-secret", body)
    cases: list[tuple[str, dict[str, str], int]] = [
        ("/hooks/generic", {}, 401),
        ("/hooks/generic", {"X-Signature": "v1=" + wrong_hmac}, 403),
        ("/hooks/generic", {"X-Signature": hmac_hex(SECRETS["HOOK_SECRET"], body)}, 403),  # no prefix
        ("/hooks/github", {}, 401),
        ("/hooks/github", {"X-Hub-Signature-256": "sha256=" + wrong_hmac}, 403),
        ("/hooks/github", {"X-Hub-Signature-256": "sha256=" + hmac_hex(SECRETS["GH_SECRET"], b"other body")}, 403),
        ("/hooks/stripe", {}, 401),
        ("/hooks/stripe", {"Stripe-Signature": stripe_header(body, secret="whsec_wrong")}, 403),
        ("/hooks/stripe", {"Stripe-Signature": stripe_header(body, at=time.time() - 600)}, 403),  # replayed
        ("/hooks/stripe", {"Stripe-Signature": "t=abc,v1=00"}, 403),
        ("/hooks/bearer", {}, 401),
        ("/hooks/bearer", {"Authorization": "Bearer wrong"}, 403),
        ("/hooks/bearer", {"Authorization": f"Basic {SECRETS['HOOK_TOKEN']}"}, 403),
    ]
    for path, headers, expected in cases:
        status, _, answer = await svc.apost(path, body, headers)
        assert status == expected, (path, headers, answer)
        assert b"secret" not in answer.lower() or b"not configured" not in answer
    assert await svc.stored("hook") == before


async def test_a_redelivery_with_the_same_delivery_id_is_the_same_event(svc: Svc) -> None:
    body = b'{"delivery": "once"}'
    headers = {
        "X-Hub-Signature-256": "sha256=" + hmac_hex(SECRETS["GH_SECRET"], body),
        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    }
    before = await svc.stored("hook")
    first = await svc.apost("/hooks/github", body, headers)
    again = await svc.apost("/hooks/github", body, headers)
    assert first[0] == again[0] == 202
    assert json.loads(first[2]) == json.loads(again[2])
    assert await svc.stored("hook") == before + 1


async def test_a_failing_webhook_follows_the_retry_policy_to_the_dlq(svc: Svc) -> None:
    mark = svc.serve.log.mark()
    status, _, answer = await svc.apost("/hooks/fail", b'{"n": 1}')
    assert status == 202, answer
    event_id = json.loads(answer)["eventId"]
    await svc.serve.log.await_line(rf"failing: request {event_id} dead-lettered", start=mark, timeout=30)
    listed = await svc.serve.acli("dlq", "ls", "failing", "--json")
    assert listed.returncode == 0, listed.stderr
    (record,) = json.loads(listed.stdout)
    assert record["error_type"] == "RuntimeError" and record["subject"] == "eventfn.async.failing"
    shown = await svc.serve.acli("dlq", "show", str(record["id"]))
    assert '"routeKey": "ANY /hooks/fail"' in shown.stdout and event_id in shown.stdout, shown.stdout


def test_a_store_nats_does_not_acknowledge_is_a_503_never_a_202(
    handlers: Path, serve: Callable[..., Serve], nats_server: NatsServer
) -> None:
    write_handler(handlers, "hook", HOOK)
    service = serve(env=SECRETS)
    svc = Svc(service)
    body = b"{}"
    headers = {"Authorization": f"Bearer {SECRETS['HOOK_TOKEN']}"}
    assert svc.post("/hooks/bearer", body, headers)[0] == 202
    nats_server.stop()
    status, headers_out, answer = svc.post("/hooks/bearer", body, headers)
    assert status == 503, answer
    assert headers_out.get("retry-after") == "1"
    service.log.wait_for(r"hook: webhook request \S+ could not be stored")


def test_stripe_signatures_expire_after_five_minutes() -> None:
    guard = Guard("stripe", "whsec_x", where="route", loopback=True)
    body = b'{"id": "evt_1"}'
    now = 1_800_000_000.0

    def request(header: str) -> Request:
        return Request(method="POST", path="/", query="", headers=[("stripe-signature", header)], client="")

    def verdict(**kwargs: Any) -> int | None:
        refusal = guard.after_body(request(stripe_header(body, secret="whsec_x", **kwargs)), body, now=now)
        return None if refusal is None else refusal.status

    assert verdict(at=now) is None
    assert verdict(at=now - 299) is None
    assert verdict(at=now - 301) == 403
    assert verdict(at=now + 301) == 403
