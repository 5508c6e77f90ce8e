"""Routing: which front answers a request, and who the caller is.

A request signed for S3 (SigV4 with service `s3` in its credential scope, in the `Authorization` header or a
presigned URL's query) is the S3 API's, whatever its path. Any other request goes to the first front that claims
its path: Lambda's API (`/2015-03-31/...`), then function URLs and routes (`/fn/<name>/...`, declared paths),
then the S3 API (`/`, `/<bucket>/...` of a bucket that exists). Nothing claims it: 404.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from eventfn.fronts.http.auth import Authenticator
from eventfn.web import BodyTooLarge, Front, Request, Response, ServerBusy

_SCOPE = re.compile(r"Credential=[^/,\s]+/\d{8}/[^/]+/([a-z0-9-]+)/aws4_request")
_QUERY_SCOPE = re.compile(r"(?:^|&)X-Amz-Credential=[^&]*?(?:/|%2F)\d{8}(?:/|%2F)[^&/%]+(?:/|%2F)([a-z0-9-]+)(?:/|%2F)")


def signed_service(request: Request) -> str | None:
    """The SigV4 service a request is signed for (`s3`, `lambda`), or None if it is not signed."""
    authorization = request.header("authorization")
    if authorization is not None and authorization.startswith("AWS4-HMAC-SHA256"):
        match = _SCOPE.search(authorization)
        return match.group(1) if match else ""
    if "X-Amz-Credential=" in request.query:
        match = _QUERY_SCOPE.search(request.query)
        return match.group(1) if match else ""
    return None


class HttpApp:
    """Answers each request with the front it belongs to."""

    def __init__(self, fronts: Sequence[Front], auth: Authenticator) -> None:
        self.fronts = list(fronts)
        self.auth = auth

    def front(self, request: Request) -> Front | None:
        service = signed_service(request)
        if service == "s3":
            for front in self.fronts:
                if front.service == "s3":
                    return front
        for front in self.fronts:
            if front.claims(request):
                return front
        return None

    async def __call__(self, request: Request) -> Response:
        front = self.front(request)
        if front is None:
            return Response(
                404,
                [("Content-Type", "application/json")],
                b'{"message":"Not Found: no function URL, route, Lambda API or bucket at this path"}',
            )
        try:
            # Reads the body where its signature covers it.
            caller = await self.auth.caller(request, api=front.service != "")
        except BodyTooLarge as exc:
            return front.too_large(request, exc.limit)
        except ServerBusy:
            return front.busy(request)
        try:
            return await front.handle(request, caller)
        except ServerBusy:
            return front.busy(request)
