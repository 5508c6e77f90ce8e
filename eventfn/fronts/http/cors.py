"""A function URL's CORS, as Lambda's function URL `Cors` config has it.

With CORS configured, eventfn answers a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
itself, without invoking the function, and adds the `Access-Control-*` headers to every response to an allowed
origin; the function's own such headers are dropped (the configured ones take precedence, Lambda's rule). An
origin that is not allowed gets no CORS headers (its browser then refuses the response). Without CORS configured,
nothing is added and an `OPTIONS` request goes to the function like any other.

`allow_credentials` goes with the origins named in `allow_origins`: `*` beside it lets any other origin in
without credentials (`Access-Control-Allow-Origin: *`), never by echoing its name with `Allow-Credentials`.
"""

from __future__ import annotations

from eventfn.config import Cors
from eventfn.web import Request, Response


class CorsPolicy:
    """The headers one `Cors` config adds."""

    __slots__ = ("any_origin", "credentials", "origins", "preflight_headers", "response_headers")

    def __init__(self, cors: Cors) -> None:
        self.any_origin = "*" in cors.allow_origins
        self.origins = frozenset(o.rstrip("/").lower() for o in cors.allow_origins if o != "*")
        self.credentials = cors.allow_credentials
        common: list[tuple[str, str]] = []
        if cors.allow_credentials:
            common.append(("Access-Control-Allow-Credentials", "true"))
        self.response_headers = [*common]
        if cors.expose_headers:
            self.response_headers.append(("Access-Control-Expose-Headers", ", ".join(cors.expose_headers)))
        self.preflight_headers = [*common]
        if cors.allow_methods:
            self.preflight_headers.append(("Access-Control-Allow-Methods", ", ".join(cors.allow_methods)))
        if cors.allow_headers:
            self.preflight_headers.append(("Access-Control-Allow-Headers", ", ".join(cors.allow_headers)))
        if cors.max_age:
            self.preflight_headers.append(("Access-Control-Max-Age", str(cors.max_age)))

    def _allow_origin(self, origin: str | None) -> list[tuple[str, str]] | None:
        """`Access-Control-Allow-Origin` (and `Vary`) for `origin`, or None if it is not allowed."""
        if origin is None:
            return None
        if origin.rstrip("/").lower() in self.origins:
            # Named, so that credentials may go with it (never with `*`); caches must key on it.
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        if self.any_origin:
            # Any origin, but without credentials even where they are allowed: echoing every origin with
            # `Allow-Credentials` would let any web page act with a visitor's cookies. Those go to named origins.
            return [("Access-Control-Allow-Origin", "*")]
        return None

    @staticmethod
    def _with(allow: list[tuple[str, str]], headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """`headers` for an allowed origin: `Allow-Credentials` only beside a named one (never beside `*`)."""
        if allow[0][1] != "*":
            return headers
        return [h for h in headers if h[0] != "Access-Control-Allow-Credentials"]

    def preflight(self, request: Request) -> Response | None:
        """The answer to a CORS preflight, or None if `request` is not one."""
        if request.method != "OPTIONS" or request.header("access-control-request-method") is None:
            return None
        origin = request.header("origin")
        allow = self._allow_origin(origin)
        if allow is None:
            return Response(200)
        return Response(200, [*allow, *self._with(allow, self.preflight_headers)])

    def apply(self, request: Request, response: Response) -> Response:
        """`response` with the CORS headers for the request's origin; the function's own are dropped either way
        (with CORS configured, the configuration decides)."""
        headers = [(n, v) for n, v in response.headers if not n.lower().startswith("access-control-")]
        allow = self._allow_origin(request.header("origin"))
        if allow is not None:
            headers += [*allow, *self._with(allow, self.response_headers)]
        response.headers = headers
        return response
