"""Lambda's Invoke API over HTTP (`/2015-03-31/functions/...`). (Skeleton: to be built.)"""

from __future__ import annotations

from eventfn.broker.bus import Bus
from eventfn.config import HttpSettings
from eventfn.invoke.functions import Functions
from eventfn.web import Caller, Request, Response

PREFIX = "/2015-03-31/"


class LambdaApi:
    service = "lambda"

    def __init__(self, functions: Functions, bus: Bus, settings: HttpSettings) -> None:
        self.functions = functions
        self.bus = bus
        self.settings = settings

    def claims(self, request: Request) -> bool:
        return request.path.startswith(PREFIX)

    async def handle(self, request: Request, caller: Caller | None) -> Response:
        return Response(501, body=b"not built yet")
