"""Who sent an HTTP request: its SigV4 signature checked against the access keys, the admin key and the
functions' execution roles (`roles`), or anyone where no credentials are required.

Credentials are required when `[http] require_auth` says so, by default when the server listens beyond loopback.
A request that carries credentials is checked whatever that setting: a wrong key or signature is refused even on
loopback (the client believes it signs, and would otherwise never learn its keys are wrong). Going unsigned is for
the service's own user on this machine: a request from a process of another user (a function's worker running as
`[workers] user`, another login; the kernel tells on Linux) is refused, as is one from a web page (an `Origin` not
of loopback, or on loopback a `Host` that is not, as DNS rebinding sends).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from eventfn.broker.auth import is_loopback
from eventfn.config import FunctionSettings, HttpSettings
from eventfn.fronts.http import peers, sigv2, sigv4
from eventfn.fronts.http.roles import (
    EVERYTHING,
    Anyone,
    Principal,
    Refused,
    admin_file,
    admin_key,
    configured_keys,
    new_role,
    role_policy,
)
from eventfn.fronts.http.sigv4 import SignatureError
from eventfn.web import Caller, Request

__all__ = ["Anyone", "Authenticator", "auth_required"]

log = logging.getLogger(__name__)

_ANYONE = Anyone()
#: Path prefixes whose API answers in Lambda's error format (the rest: S3's) when no signature says which.
_LAMBDA_PATHS = ("/2015-03-31/", "/fn/")


def auth_required(settings: HttpSettings) -> bool:
    """Whether the Lambda and S3 APIs require credentials: as set, else when listening beyond loopback."""
    if settings.require_auth is not None:
        return settings.require_auth
    return not is_loopback(settings.host)


class Authenticator:
    """Verifies requests' credentials, and holds the functions' execution roles (made anew at every start)."""

    def __init__(
        self,
        settings: HttpSettings,
        data_dir: Path | str,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.required = auth_required(settings)
        #: Listening on loopback only: the one case where a request's `Host` must name this machine.
        self.loopback = is_loopback(settings.host)
        #: The service's user: its processes (and root's) may send requests without credentials on loopback.
        self.uid = os.geteuid() if hasattr(os, "geteuid") else -1
        self.clock = clock
        self.verifier = sigv4.Verifier()
        #: Access key id -> who it is: the configured keys, the admin key, the roles.
        self._keys: dict[str, Principal] = {
            key: Principal(key, key, secret, EVERYTHING)
            for key, secret in configured_keys(settings, os.environ if environ is None else environ).items()
        }
        #: Function -> its execution role.
        self._roles: dict[str, Principal] = {}
        self.admin_file = admin_file(data_dir)
        if settings.enabled:
            key, secret = admin_key(data_dir)
            self._keys.setdefault(key, Principal(key, key, secret, EVERYTHING))
            log.info(
                "HTTP APIs: the admin access key is in %s (`credential_process = cat %s` in an AWS profile uses it); "
                "%d more from [http] access_keys; requests without credentials %s",
                self.admin_file,
                self.admin_file,
                len(settings.access_keys),
                "are refused" if self.required else "may do anything (loopback)",
            )
            if not self.required and not is_loopback(settings.host):
                log.warning(
                    "HTTP APIs on %s accept requests without credentials ([http] require_auth = false): anyone who "
                    "reaches them may invoke every function and read and write every bucket",
                    settings.host,
                )

    # -- the functions' roles -------------------------------------------------------------------------------

    def role(self, function: str, settings: FunctionSettings) -> Principal:
        """`function`'s execution role, made at the first ask and kept for this run, with the policy of
        `settings` (the version about to load: its init code may already call the APIs)."""
        role = self._roles.get(function)
        if role is None:
            role = self._roles[function] = new_role(function, settings, self._keys)
            self._keys[role.access_key] = role
        else:
            role.policy = role_policy(settings)
        return role

    def environment(self, function: str, settings: FunctionSettings) -> dict[str, str]:
        """The variables that give `function`'s workers its role, as Lambda gives them: boto3 and the aws CLI
        read them."""
        role = self.role(function, settings)
        assert role.token is not None
        return {
            "AWS_ACCESS_KEY_ID": role.access_key,
            "AWS_SECRET_ACCESS_KEY": role.secret,
            "AWS_SESSION_TOKEN": role.token,
        }

    def update(self, functions: Mapping[str, FunctionSettings | None]) -> None:
        """The functions after a reload, each with the settings of the version serving (None: none serves): a
        serving function's role takes its policy; the roles of the others are dropped (no worker holds them)."""
        for name in [n for n in self._roles if functions.get(n) is None]:
            del self._keys[self._roles.pop(name).access_key]
        for name, settings in functions.items():
            if settings is not None and name in self._roles:
                self._roles[name].policy = role_policy(settings)

    # -- requests -------------------------------------------------------------------------------------------

    async def caller(self, request: Request, *, api: bool = True) -> Caller:
        """Who sent `request`: a principal whose signature holds, anyone (no credentials, none required), or a
        refused caller whose `problem` is AWS's error for it. Reads the body of a request signed over its hash
        (up to `[http] max_body`: `BodyTooLarge` past it). `api`: the request is for the Lambda or S3 API, not a
        function URL (which asks only a signed caller anything): only then is the sender of an unsigned one
        looked up."""
        try:
            signed = sigv4.parse(request)
            legacy = sigv2.parse(request) if signed is None else None
        except SignatureError as exc:
            return Refused(sigv4.problem(exc, _service(request)))
        if legacy is not None:
            return self._legacy(request, legacy)
        if signed is None:
            if not self.required:
                if api and (why := self._not_anyone(request)) is not None:
                    return Refused(sigv4.problem(SignatureError(sigv4.MISSING, why), _service(request)))
                return _ANYONE
            missing = SignatureError(
                sigv4.MISSING,
                "this API requires credentials: sign with an access key of [http] access_keys or the admin key in "
                "<data_dir>/auth/http.json",
            )
            return Refused(sigv4.problem(missing, _service(request)))
        try:
            principal = self._principal(signed)
            sigv4.check_time(signed, self.clock())
            await self.verifier.verify(request, signed, principal.secret, body_limit=self.settings.max_body)
        except SignatureError as exc:
            exc.presigned = signed.presigned
            return Refused(sigv4.problem(exc, signed.service))
        return principal

    def _not_anyone(self, request: Request) -> str | None:
        """Why a request without credentials, where none are required, may still do nothing; None if it may do
        anything."""
        if (page := self._web_page(request)) is not None:
            return (
                f"a request without credentials from a web page ({page}) may do nothing here: only programs on "
                "this machine may go unsigned; sign it with an access key"
            )
        if (user := self._other_user(request)) is not None:
            return (
                f"a request without credentials from {user} may do nothing here: only the service's own user "
                f"(uid {self.uid}) may go unsigned on loopback; a function signs with its role's keys (boto3 and "
                "the aws CLI do by themselves), anyone else with an access key"
            )
        return None

    def _web_page(self, request: Request) -> str | None:
        """What shows a request without credentials to come from a web page, or None. Anyone on this machine may
        use the APIs unsigned; a page in a browser here must not: another site's page posting a form (`Origin`),
        or reading through a name of its own that resolves to 127.0.0.1 (DNS rebinding: its `Host`)."""
        origin = request.header("origin")
        if origin is not None and not is_loopback(_hostname(origin.partition("://")[2])):
            return f"Origin {origin[:100]!r}"
        host = request.header("host")
        if self.loopback and host is not None and not is_loopback(_hostname(host)):
            return f"Host {host[:100]!r}"
        return None

    def _other_user(self, request: Request) -> str | None:
        """Which user other than the service's (and root) sent an unsigned request from this machine, or None: a
        function's worker running as its own user (whose role's policy would mean nothing if it could drop its
        keys), another login. Where the kernel does not tell (not Linux), nobody."""
        if not peers.AVAILABLE or not is_loopback(request.client):
            return None
        uid = request.peer_uid()
        if uid is None:
            return "a process the kernel does not name"
        return None if uid in (self.uid, 0) else f"a process of uid {uid}"

    def _legacy(self, request: Request, signed: sigv2.Signed) -> Caller:
        """The caller of a Signature Version 2 presigned URL (S3's only: boto3 presigns S3 URLs so by default)."""
        try:
            if _service(request) != "s3":
                raise SignatureError(sigv4.MALFORMED, "Signature Version 2 is S3's only: sign with SigV4")
            principal = self._principal(signed)
            sigv2.check(request, signed, principal.secret, self.clock())
        except SignatureError as exc:
            exc.presigned = True
            return Refused(sigv4.problem(exc, _service(request)))
        return principal

    def _principal(self, signed: sigv4.Signed | sigv2.Signed) -> Principal:
        principal = self._keys.get(signed.access_key)
        if principal is None:
            if signed.token is not None:
                # What AWS says of a temporary key gone stale; here, a function's role from an earlier start.
                raise SignatureError(
                    sigv4.EXPIRED_TOKEN,
                    "no running function has this key: roles' keys are made anew at every start of the service",
                )
            raise SignatureError(
                sigv4.UNKNOWN_KEY,
                f"access key {signed.access_key[:64]!r} is not one of [http] access_keys or the admin key",
            )
        if principal.token is None:
            if signed.token is not None:
                raise SignatureError(sigv4.BAD_TOKEN, "this access key takes no session token")
        elif signed.token is None or not hmac.compare_digest(
            signed.token.encode("utf-8", "surrogatepass"), principal.token.encode()
        ):
            raise SignatureError(sigv4.BAD_TOKEN, "the session token is not the one of this access key")
        return principal


def _hostname(authority: str) -> str:
    """The host of `host[:port]` (`[v6]:port` too), lower-case, without a trailing dot."""
    host = authority.partition("/")[0].rpartition("@")[2]
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    else:
        host = host.partition(":")[0]
    return host.lower().rstrip(".")


def _service(request: Request) -> str:
    """Which API's error codes answer a request whose signature does not say (`lambda` or `s3`)."""
    return "lambda" if request.path.startswith(_LAMBDA_PATHS) else "s3"
