"""AWS Signature Version 2 presigned URLs (`?AWSAccessKeyId=...&Expires=...&Signature=...`): what boto3 makes by
default, since an S3 client's `generate_presigned_url` signs with SigV2 unless `signature_version="s3v4"` is set.
S3 takes them; so does the S3 API here, and only it.

The string signed is S3's (botocore's `HmacV1QueryAuth` builds it), from the request as it arrives:

- the method, then `Content-MD5` and `Content-Type` (the request's headers, or the copies botocore puts in the
  query when the request has none), then `Expires`;
- every `x-amz-*` header of the request and `x-amz-*` parameter of the query (`x-amz-security-token` of a function's
  role, say), lower-cased, sorted, `name:value` a line: an `x-amz-*` header the URL did not sign breaks it;
- the path as sent, and the query's sub-resources (`uploadId`, `partNumber`, `response-content-type`, ...) sorted.

The signature is the base64 HMAC-SHA1 of that string by the secret key; a URL is good until `Expires` (seconds since
the epoch).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Final
from urllib.parse import unquote

from eventfn.fronts.http.sigv4 import BAD_SIGNATURE, EXPIRED, MALFORMED, SignatureError
from eventfn.web import Request

#: The query's parameters that are part of the signed resource (botocore's `HmacV1Auth.QSAOfInterest`).
SUBRESOURCES: Final = frozenset(
    "accelerate acl analytics cors defaultObjectAcl delete inventory lifecycle location logging metrics notification "
    "object-lock partNumber policy replication requestPayment response-cache-control response-content-disposition "
    "response-content-encoding response-content-language response-content-type response-expires restore select "
    "select-type storageClass tagging torrent uploadId uploads versionId versioning versions website".split()
)
_PARAMETERS = ("AWSAccessKeyId", "Expires", "Signature")


class Signed:
    """What a SigV2 presigned URL claims: who, until when, with which signature (and session token)."""

    __slots__ = ("access_key", "expires", "parameters", "signature", "token")

    #: Always a presigned URL (S3 names its malformed ones so).
    presigned = True

    def __init__(self, access_key: str, expires: int, signature: str, parameters: dict[str, str]) -> None:
        self.access_key = access_key
        self.expires = expires
        self.signature = signature
        #: The query's parameters, decoded (the first of each name).
        self.parameters = parameters
        self.token = parameters.get("x-amz-security-token")


def parse(request: Request) -> Signed | None:
    """What `request`'s SigV2 presigned URL claims; None if its query has no `AWSAccessKeyId`. `SignatureError`
    (`MALFORMED`) for one that is not well formed."""
    if "AWSAccessKeyId=" not in request.query:
        return None
    parameters: dict[str, str] = {}
    for part in request.query.split("&"):
        name, _, value = part.partition("=")
        name = unquote(name)
        if name in _PARAMETERS and name in parameters:
            raise SignatureError(MALFORMED, f"{name} is given twice", presigned=True)
        parameters.setdefault(name, unquote(value))
    missing = [name for name in _PARAMETERS if not parameters.get(name)]
    if missing:
        raise SignatureError(MALFORMED, f"a Signature Version 2 URL needs {', '.join(missing)}", presigned=True)
    expires = parameters["Expires"]
    if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
        raise SignatureError(MALFORMED, "Expires must be a time in seconds since the epoch", presigned=True)
    return Signed(parameters["AWSAccessKeyId"], int(expires), parameters["Signature"], parameters)


def check(request: Request, signed: Signed, secret: str, now: float) -> None:
    """Whether `signed` is `request`'s signature by `secret`, still valid at `now`: `SignatureError` if not."""
    if now > signed.expires:
        ends = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(min(signed.expires, 253402300799)))
        raise SignatureError(EXPIRED, f"the presigned URL expired at {ends}", presigned=True)
    digest = hmac.new(secret.encode("utf-8"), string_to_sign(request, signed).encode("utf-8"), hashlib.sha1).digest()
    if not hmac.compare_digest(base64.b64encode(digest).decode("ascii"), signed.signature):
        raise SignatureError(BAD_SIGNATURE, "check your secret key and signing method", presigned=True)


def string_to_sign(request: Request, signed: Signed) -> str:
    """S3's string to sign for a SigV2 presigned URL (see the module's docstring)."""
    parameters = signed.parameters
    standard = [
        request.header(name) or parameters.get(name, "") for name in ("content-md5", "content-type")
    ]  # fmt: skip
    custom = {name: value for name, value in parameters.items() if name.startswith("x-amz-")}
    for name in {name for name, _ in request.headers if name.startswith("x-amz-")}:
        value = ",".join(v.strip() for v in request.header_values(name))
        custom[name] = f"{custom[name]},{value}" if name in custom and custom[name] != value else value
    lines = [request.method, *(value.strip() for value in standard), str(signed.expires)]
    lines += [f"{name}:{custom[name]}" for name in sorted(custom)]
    resource = request.path
    subresources = sorted(
        (p.partition("=") for p in request.query.split("&") if p.partition("=")[0] in SUBRESOURCES),
        key=lambda found: found[0],
    )
    if subresources:
        resource += "?" + "&".join(name + equals + unquote(value) for name, equals, value in subresources)
    lines.append(resource)
    return "\n".join(lines)
