"""AWS Signature Version 4: what a request's signature claims, and whether it holds.

Both forms are read: the `Authorization: AWS4-HMAC-SHA256 Credential=<key>/<date>/<region>/<service>/aws4_request,
SignedHeaders=..., Signature=...` header, and a presigned URL's `X-Amz-Algorithm`, `X-Amz-Credential`, `X-Amz-Date`,
`X-Amz-Expires`, `X-Amz-SignedHeaders`, `X-Amz-Signature` (and `X-Amz-Security-Token`) query parameters.

The canonical request is rebuilt the way botocore builds it (`botocore/auth.py`), from the request as it arrived:

- the path as sent; for `s3` as it is, for other services with dot segments and empty segments removed and then
  percent-encoded once more (SigV4's "double encoding" of all services but S3);
- the query's `key=value` pairs as sent, sorted (the presigned URL's `X-Amz-Signature` left out);
- the signed headers, lower-cased and sorted, each value trimmed and its inner runs of spaces made one, repeated
  headers joined with `,`;
- the payload hash: `x-amz-content-sha256` as it is when the request has it (a hex digest, `UNSIGNED-PAYLOAD`,
  `STREAMING-...`), `UNSIGNED-PAYLOAD` for a presigned S3 URL, else the SHA-256 of the body (read whole, up to the
  body limit; the front reads it again from the request's cache).

A client that percent-encodes differently from botocore (but as SigV4 says: RFC 3986's unreserved characters
kept, everything else encoded) is checked against that spelling too. A body signed by its hex SHA-256 in
`x-amz-content-sha256` is checked as the front reads it (`Request.expect_sha256`), so a large object streams.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from calendar import timegm
from datetime import UTC, datetime
from email.utils import parsedate_tz
from typing import Final
from urllib.parse import quote, unquote, unquote_to_bytes

from eventfn.web import DEFAULT_BODY_LIMIT, Request

ALGORITHM: Final = "AWS4-HMAC-SHA256"
#: Seconds a signature's time may be away from ours (AWS's 15 minutes).
MAX_SKEW: Final = 15 * 60
#: The longest a presigned URL may be valid (AWS's 7 days).
MAX_EXPIRES: Final = 7 * 24 * 3600
UNSIGNED_PAYLOAD: Final = "UNSIGNED-PAYLOAD"
#: Signing keys cached at most (one per secret, day, region and service).
KEY_CACHE: Final = 1024

#: Why a request's credentials are refused (`SignatureError.kind`); `problem` gives each its AWS error code.
MISSING: Final = "missing"
MALFORMED: Final = "malformed"
UNKNOWN_KEY: Final = "unknown-key"
BAD_SIGNATURE: Final = "bad-signature"
UNSIGNED_HEADERS: Final = "unsigned-headers"
SKEWED: Final = "skewed"
EXPIRED: Final = "expired"
BAD_TOKEN: Final = "bad-token"
EXPIRED_TOKEN: Final = "expired-token"

_TIMESTAMP = re.compile(r"^([0-9]{8})T[0-9]{6}Z$")
_SIGNATURE = re.compile(r"^[0-9a-f]{64}$")
_HEX_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
#: AWS headers a signature may leave out: both are checked by other means (the token against the key's, the
#: payload hash as the canonical request's last line).
_UNSIGNED_ALLOWED = frozenset({"x-amz-security-token", "x-amz-content-sha256"})
_QUERY_NAMES = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
)


class SignatureError(Exception):
    """A request's SigV4 credentials are refused: `kind` says why (one of the constants above)."""

    def __init__(self, kind: str, detail: str, *, presigned: bool = False) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        #: Whether the credentials were a presigned URL's (S3 names its malformed ones differently).
        self.presigned = presigned


class Signed:
    """What a request's signature claims: who, when, for which scope, over which headers."""

    __slots__ = (
        "access_key",
        "date",
        "expires",
        "presigned",
        "region",
        "service",
        "signature",
        "signed_headers",
        "timestamp",
        "token",
        "when",
    )

    def __init__(
        self,
        *,
        access_key: str,
        date: str,
        region: str,
        service: str,
        timestamp: str,
        signed_headers: list[str],
        signature: str,
        token: str | None,
        presigned: bool,
        expires: int = 0,
    ) -> None:
        self.access_key = access_key
        self.date = date
        self.region = region
        self.service = service
        #: `YYYYMMDDTHHMMSSZ`, as signed.
        self.timestamp = timestamp
        #: The same, in seconds since the epoch.
        self.when = _epoch(timestamp)
        self.signed_headers = signed_headers
        self.signature = signature
        self.token = token
        self.presigned = presigned
        #: Seconds a presigned URL is valid for from `when`.
        self.expires = expires

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


def parse(request: Request) -> Signed | None:
    """What `request`'s SigV4 signature claims; None if it carries no AWS credentials. `SignatureError`
    (`MALFORMED`) for credentials that are not a well-formed SigV4 signature."""
    authorization = request.header("authorization")
    presigned = "X-Amz-Credential=" in request.query or "X-Amz-Algorithm=" in request.query
    if authorization is not None and authorization.startswith("AWS"):
        if presigned:
            raise SignatureError(MALFORMED, "both an Authorization header and X-Amz-* query parameters: use one")
        return _parse_header(request, authorization)
    if presigned:
        return _parse_query(request)
    return None  # (a Signature Version 2 presigned URL is `sigv2`'s)


def _parse_header(request: Request, authorization: str) -> Signed:
    algorithm, _, rest = authorization.partition(" ")
    if algorithm != ALGORITHM:
        raise SignatureError(MALFORMED, f"unsupported authorization {algorithm!r}: only {ALGORITHM} (SigV4) is")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, equals, value = part.strip().partition("=")
        if equals:
            fields[name] = value.strip()
    missing = [name for name in ("Credential", "SignedHeaders", "Signature") if name not in fields]
    if missing:
        raise SignatureError(MALFORMED, f"the Authorization header lacks {', '.join(missing)}")
    timestamp = request.header("x-amz-date")
    if timestamp is None and (date := request.header("date")) is not None:
        timestamp = _http_date(date)
    if timestamp is None:
        raise SignatureError(MALFORMED, "no X-Amz-Date (or Date) header: the signature's time is needed")
    return _signed(
        credential=fields["Credential"],
        timestamp=timestamp,
        signed_headers=fields["SignedHeaders"],
        signature=fields["Signature"],
        token=request.header("x-amz-security-token"),
        presigned=False,
    )


def _parse_query(request: Request) -> Signed:
    try:
        return _read_query(request)
    except SignatureError as exc:
        exc.presigned = True
        raise


def _read_query(request: Request) -> Signed:
    found: dict[str, str] = {}
    for part in request.query.split("&"):
        name, _, value = part.partition("=")
        name = unquote(name)
        if name in _QUERY_NAMES:
            if name in found:
                raise SignatureError(MALFORMED, f"{name} is given twice")
            found[name] = unquote(value)
    missing = [name for name in _QUERY_NAMES[:-1] if name not in found]
    if missing:
        raise SignatureError(MALFORMED, f"a presigned URL needs {', '.join(missing)}")
    if found["X-Amz-Algorithm"] != ALGORITHM:
        raise SignatureError(MALFORMED, f"X-Amz-Algorithm must be {ALGORITHM}")
    raw = found["X-Amz-Expires"]
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_EXPIRES:
        raise SignatureError(MALFORMED, f"X-Amz-Expires must be a number of seconds from 1 to {MAX_EXPIRES}")
    return _signed(
        credential=found["X-Amz-Credential"],
        timestamp=found["X-Amz-Date"],
        signed_headers=found["X-Amz-SignedHeaders"],
        signature=found["X-Amz-Signature"],
        token=found.get("X-Amz-Security-Token"),
        presigned=True,
        expires=int(raw),
    )


def _signed(
    *,
    credential: str,
    timestamp: str,
    signed_headers: str,
    signature: str,
    token: str | None,
    presigned: bool,
    expires: int = 0,
) -> Signed:
    parts = credential.rsplit("/", 4)
    if len(parts) != 5 or parts[4] != "aws4_request" or not all(parts[:4]):
        raise SignatureError(MALFORMED, "Credential must be <access key>/<YYYYMMDD>/<region>/<service>/aws4_request")
    access_key, date, region, service, _ = parts
    match = _TIMESTAMP.match(timestamp)
    if match is None:
        raise SignatureError(MALFORMED, f"the signature's time {timestamp!r} is not YYYYMMDDTHHMMSSZ")
    if match.group(1) != date:
        raise SignatureError(MALFORMED, f"the Credential's date {date} is not the day of X-Amz-Date {timestamp}")
    names = signed_headers.split(";")
    if "host" not in names:
        raise SignatureError(MALFORMED, "SignedHeaders must include host")
    if not _SIGNATURE.match(signature):
        raise SignatureError(MALFORMED, "Signature must be 64 lower-case hex digits")
    try:
        return Signed(
            access_key=access_key,
            date=date,
            region=region,
            service=service,
            timestamp=timestamp,
            signed_headers=sorted(set(names)),
            signature=signature,
            token=token,
            presigned=presigned,
            expires=expires,
        )
    except ValueError:  # a 13th month, a 25th hour
        raise SignatureError(MALFORMED, f"the signature's time {timestamp!r} is not a valid time") from None


def _epoch(timestamp: str) -> float:
    """`YYYYMMDDTHHMMSSZ` in seconds since the epoch; ValueError for a 13th month or a 25th hour."""
    t = timestamp
    when = datetime(int(t[0:4]), int(t[4:6]), int(t[6:8]), int(t[9:11]), int(t[11:13]), int(t[13:15]), tzinfo=UTC)
    return when.timestamp()


def _http_date(value: str) -> str | None:
    parsed = parsedate_tz(value)
    if parsed is None:
        return None
    try:
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(timegm(parsed[:9]) - (parsed[9] or 0)))
    except (OverflowError, ValueError, OSError):  # a year past what the platform's time takes
        return None


def check_time(signed: Signed, now: float) -> None:
    """`SKEWED` for a signature made more than `MAX_SKEW` away from `now` (a presigned URL: made in the future),
    `EXPIRED` for a presigned URL past its `X-Amz-Expires`."""
    if signed.presigned:
        if signed.when - now > MAX_SKEW:
            raise SignatureError(SKEWED, f"the request is not valid yet: it was signed for {signed.timestamp}")
        if now > signed.when + signed.expires:
            ends = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(signed.when + signed.expires))
            raise SignatureError(EXPIRED, f"the presigned URL expired at {ends}")
    elif abs(now - signed.when) > MAX_SKEW:
        raise SignatureError(
            SKEWED,
            f"signed at {signed.timestamp}, now is {time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}: more than "
            f"{MAX_SKEW // 60} minutes apart (is the client's clock right?)",
        )


class Verifier:
    """Checks signatures against a secret; keeps the signing keys it derived (one per secret, day, region and
    service), since deriving one takes four HMACs."""

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str, str, str], bytes] = {}

    def signing_key(self, secret: str, date: str, region: str, service: str) -> bytes:
        cached = (secret, date, region, service)
        key = self._keys.get(cached)
        if key is None:
            key = _hmac(("AWS4" + secret).encode(), date)
            for part in (region, service, "aws4_request"):
                key = _hmac(key, part)
            if len(self._keys) >= KEY_CACHE:
                self._keys.clear()
            self._keys[cached] = key
        return key

    async def verify(
        self, request: Request, signed: Signed, secret: str, *, body_limit: int = DEFAULT_BODY_LIMIT
    ) -> None:
        """Whether `signed` is `request`'s signature by `secret`: `SignatureError` (`BAD_SIGNATURE`,
        `UNSIGNED_HEADERS`) if not. May read the body (up to `body_limit`: `BodyTooLarge` past it); a body signed
        by its declared SHA-256 is checked as the front reads it."""
        # AWS's own headers change what a request does (`x-amz-copy-source` makes a PUT a copy): each must be
        # signed, in a presigned URL's request too, or whoever holds the URL could make it do something else.
        unsigned = sorted(
            {
                n
                for n, _ in request.headers
                if n.startswith("x-amz-") and n not in signed.signed_headers and n not in _UNSIGNED_ALLOWED
            }
        )
        if unsigned:
            raise SignatureError(
                UNSIGNED_HEADERS, f"headers present in the request were not signed: {', '.join(unsigned)}"
            )
        declared = request.header("x-amz-content-sha256")
        if declared is not None:
            payload = declared
        elif signed.presigned and signed.service == "s3":
            payload = UNSIGNED_PAYLOAD
        else:
            payload = hashlib.sha256(await request.read(body_limit)).hexdigest()
        headers = "".join(f"{name}:{_header_value(request, name)}\n" for name in signed.signed_headers)
        names = ";".join(signed.signed_headers)
        key = self.signing_key(secret, signed.date, signed.region, signed.service)
        scope = signed.scope
        for uri, query in _candidates(request, signed):
            canonical = "\n".join((request.method, uri, query, headers, names, payload))
            to_sign = "\n".join(
                (ALGORITHM, signed.timestamp, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest())
            )
            expected = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
            if hmac.compare_digest(expected, signed.signature):
                if declared is not None and _HEX_SHA256.match(declared):
                    request.expect_sha256(declared)
                return
        raise SignatureError(BAD_SIGNATURE, "check your secret key and signing method")


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def _header_value(request: Request, name: str) -> str:
    return ",".join(" ".join(value.split()) for value in request.header_values(name))


def _candidates(request: Request, signed: Signed) -> list[tuple[str, str]]:
    """The canonical (path, query) pairs to check: botocore's spelling, then SigV4's from the decoded request
    where that differs (a client that encodes a character botocore leaves, or the other way round)."""
    s3 = signed.service == "s3"
    path = request.path or "/"
    raw = _raw(path)
    if s3:
        uri = path
        normal = quote(unquote_to_bytes(raw), safe="/~")
    else:
        uri = quote(_raw(_remove_dot_segments(path) or "/"), safe="/~")
        once = quote(unquote_to_bytes(_raw(_remove_dot_segments(path) or "/")), safe="/~")
        normal = quote(once, safe="/~")
    pairs: list[tuple[str, str]] = []
    encoded: list[tuple[str, str]] = []
    if request.query:
        for part in request.query.split("&"):
            key, _, value = part.partition("=")
            if signed.presigned and unquote(key) == "X-Amz-Signature":
                continue
            pairs.append((key, value))
            encoded.append((_encode(key), _encode(value)))
    query = "&".join(f"{k}={v}" for k, v in sorted(pairs))
    normal_query = "&".join(f"{k}={v}" for k, v in sorted(encoded))
    found = [(uri, query)]
    if (normal, normal_query) != (uri, query):
        found.append((normal, normal_query))
    return found


def _raw(text: str) -> bytes:
    """The bytes the server decoded `text` from (latin-1), or its UTF-8 for text made in-process."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _encode(part: str) -> str:
    # `+` is a space to the fronts (`parse_qsl`): spelled as one here, never as the `%2B` a signature may cover.
    return quote(unquote_to_bytes(_raw(part).replace(b"+", b"%20")), safe="-_.~")


def _remove_dot_segments(path: str) -> str:
    # botocore's (RFC 3986 5.2.4, and empty segments dropped as AWS services want them).
    if not path:
        return ""
    out: list[str] = []
    for segment in path.split("/"):
        if segment and segment != ".":
            if segment == "..":
                if out:
                    out.pop()
            else:
                out.append(segment)
    first = "/" if path[0] == "/" else ""
    last = "/" if path[-1] == "/" and out else ""
    return first + "/".join(out) + last


# -- AWS's error codes ----------------------------------------------------------------------------------------

_NOT_SIGNED = "The request signature we calculated does not match the signature you provided"
#: kind -> (S3's code, other services' (Lambda's) code, AWS's message).
_CODES: Final = {
    MISSING: ("AccessDenied", "MissingAuthenticationTokenException", "Missing Authentication Token"),
    MALFORMED: ("AuthorizationHeaderMalformed", "IncompleteSignatureException", "The authorization is malformed"),
    UNKNOWN_KEY: (
        "InvalidAccessKeyId",
        "UnrecognizedClientException",
        "The AWS Access Key Id you provided does not exist in our records",
    ),
    BAD_SIGNATURE: ("SignatureDoesNotMatch", "InvalidSignatureException", _NOT_SIGNED),
    UNSIGNED_HEADERS: ("AccessDenied", "InvalidSignatureException", "There were headers present that were not signed"),
    SKEWED: (
        "RequestTimeTooSkewed",
        "InvalidSignatureException",
        "The difference between the request time and the current time is too large",
    ),
    EXPIRED: ("AccessDenied", "InvalidSignatureException", "Request has expired"),
    BAD_TOKEN: ("InvalidToken", "UnrecognizedClientException", "The security token included in the request is invalid"),
    EXPIRED_TOKEN: ("ExpiredToken", "ExpiredTokenException", "The security token included in the request is expired"),
}


def problem(error: SignatureError, service: str) -> tuple[str, str]:
    """AWS's error code and message for `error` as `service` (`s3`, `lambda`) answers it."""
    s3_code, other_code, message = _CODES[error.kind]
    if service == "s3":
        code = "AuthorizationQueryParametersError" if error.kind == MALFORMED and error.presigned else s3_code
    else:
        code = other_code
    return code, f"{message}: {error.detail}"
