"""Function URLs (`/fn/<name>/...`), declared routes and webhooks. (Skeleton: to be built.)"""

from __future__ import annotations

from eventfn.broker.bus import Bus
from eventfn.config import HttpSettings
from eventfn.invoke.functions import Functions
from eventfn.web import Caller, Request, Response

PREFIX = "/fn/"


class FunctionUrls:
    service = ""

    def __init__(self, functions: Functions, bus: Bus, settings: HttpSettings) -> None:
        self.functions = functions
        self.bus = bus
        self.settings = settings

    def update(self) -> None:
        """The functions changed (a reload): read their routes again."""

    def claims(self, request: Request) -> bool:
        return request.path.startswith(PREFIX)

    async def handle(self, request: Request, caller: Caller | None) -> Response:
        return Response(501, body=b"not built yet")
