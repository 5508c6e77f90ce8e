"""Who may call a function URL or route (`auth`), checked before anything runs.

| auth       | the request must carry                                                                    |
|------------|-------------------------------------------------------------------------------------------|
| (unset)    | nothing while the server listens on loopback; beyond it the URL answers 403 until declared  |
| `none`     | nothing                                                                                   |
| `aws_iam`  | SigV4 from an access key or execution role allowed `lambda:InvokeFunctionUrl` on it         |
| `bearer`   | `Authorization: Bearer <secret>`                                                          |
| `hmac`     | `<signature_header>: <signature_prefix><hex HMAC-SHA256 of the body>`                     |
| `github`   | `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>` (GitHub's webhooks)            |
| `stripe`   | `Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, t within 5 minutes |

Missing credentials answer 401, wrong ones 403 (`aws_iam`: Lambda's 403 `{"Message":"Forbidden"}`); digests are
compared in constant time. A secret is given literally or as `env:NAME` (the service's environment variable
NAME); a variable that is not set makes the URL answer 503 and is logged once, by name. No secret is ever logged
or answered.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Mapping

import msgspec

from eventfn.config import ENV_SECRET, HttpAuth, secret_value
from eventfn.fronts.http.roles import Anyone
from eventfn.web import Caller, Request, Response

#: Stripe's default tolerance: a signature's timestamp may be this many seconds from now.
STRIPE_TOLERANCE = 300
_BODY_AUTH = frozenset({"hmac", "github", "stripe"})
_json = msgspec.json.Encoder()


def is_loopback(host: str) -> bool:
    """Whether the server binds loopback only (127.0.0.0/8, ::1, localhost): nobody else can reach it."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def denied(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """A refusal: JSON `{"message": ...}`, as API Gateway and function URLs answer."""
    return Response(status, [("Content-Type", "application/json"), *headers], _json.encode({"message": message}))


def iam_forbidden() -> Response:
    """Lambda's answer to a function URL call IAM does not allow, word for word."""
    return Response(403, [("Content-Type", "application/json")], b'{"Message":"Forbidden"}')


class Guard:
    """The check of one URL or route: its auth kind and secret (resolved from the environment once)."""

    __slots__ = ("auth", "header", "missing", "open_by_default", "prefix", "secret", "where")

    def __init__(
        self,
        auth: HttpAuth | None,
        secret: str | None,
        *,
        where: str,
        loopback: bool,
        signature_header: str = "X-Signature-256",
        signature_prefix: str = "sha256=",
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.auth = auth
        #: Where this guard is declared, for messages: `function URL hello`, `route POST /hooks of function h`.
        self.where = where
        self.open_by_default = loopback
        self.header = {"github": "x-hub-signature-256", "stripe": "stripe-signature"}.get(
            auth or "", signature_header.lower()
        )
        self.prefix = "sha256=" if auth == "github" else signature_prefix
        #: The environment variable a secret should come from and does not (503 until it is set).
        self.missing: str | None = None
        self.secret: bytes | None = None
        if secret is not None:
            value = secret_value(secret, environ)
            if value is None:
                self.missing = secret.removeprefix(ENV_SECRET)
            else:
                self.secret = value.encode()

    @property
    def needs_body(self) -> bool:
        """Whether the check reads the body (a signature over it)."""
        return self.auth in _BODY_AUTH

    def problem(self) -> str | None:
        """What is wrong with this guard's configuration (for the log, once), or None."""
        if self.missing is not None:
            return (
                f"{self.where}: its secret comes from environment variable {self.missing}, which the service does "
                "not have; it answers 503 until the variable is set and the service restarted"
            )
        return None

    def before_body(self, request: Request, caller: Caller | None) -> Response | None:
        """The refusal of a request on what its head shows, or None to go on."""
        auth = self.auth
        if auth is None:
            if self.open_by_default:
                return None
            return denied(
                403,
                f"Forbidden: {self.where} declares no auth and eventfn listens beyond loopback; declare its "
                'auth ("none" to open it to anyone on purpose, or bearer, hmac, github, stripe, aws_iam)',
            )
        if auth == "none":
            return None
        if auth == "aws_iam":
            # Anyone (no credentials, where the APIs require none) is no identity: the URL asked for a signature.
            if caller is None or caller.problem is not None or isinstance(caller, Anyone):
                return iam_forbidden()
            return None  # whether this caller may invoke this function is the front's to ask (it knows the name)
        if self.secret is None:
            return denied(503, f"Service Unavailable: the secret that verifies {self.where} is not configured")
        if auth == "bearer":
            value = request.header("authorization")
            if value is None:
                return denied(
                    401, "Unauthorized: send Authorization: Bearer <token>", (("WWW-Authenticate", "Bearer"),)
                )
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.secret):
                return denied(403, "Forbidden: the bearer token is not valid")
            return None
        if request.header(self.header) is None:
            return denied(401, f"Unauthorized: the {self.header} signature header is missing")
        return None

    def after_body(self, request: Request, body: bytes, now: float | None = None) -> Response | None:
        """The refusal of a request whose signature over `body` does not verify, or None."""
        if not self.needs_body:
            return None
        assert self.secret is not None, "before_body refused it"
        value = request.header(self.header) or ""
        if self.auth == "stripe":
            ok = _stripe_ok(value, body, self.secret, time.time() if now is None else now)
        else:
            ok = value.startswith(self.prefix) and _digest_ok(
                value[len(self.prefix) :].strip(), hmac.new(self.secret, body, hashlib.sha256).hexdigest()
            )
        if not ok:
            return denied(403, f"Forbidden: the {self.header} signature does not verify")
        return None


def _digest_ok(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.lower().encode("ascii", "replace"), expected.encode())


def _stripe_ok(header: str, body: bytes, secret: bytes, now: float) -> bool:
    """Stripe's scheme: `t=<time>,v1=<sig>[,v1=...]`; any v1 over `<t>.<body>` verifies, if t is recent."""
    stamp: str | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            stamp = value
        elif key == "v1":
            signatures.append(value)
    if stamp is None or not stamp.isdigit() or len(stamp) > 12 or not signatures:
        return False
    if abs(now - int(stamp)) > STRIPE_TOLERANCE:
        return False
    expected = hmac.new(secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    # Every candidate is compared (no early exit), so timing says nothing about which one was close.
    return sum(_digest_ok(s, expected) for s in signatures) > 0
