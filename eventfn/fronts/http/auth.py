"""Who sent an HTTP request: AWS SigV4 against the configured access keys and the functions' execution roles.

(Skeleton: every request is taken as anyone's. Replaced by the SigV4 verifier and the roles.)
"""

from __future__ import annotations

from eventfn.web import Request


class Anyone:
    """A caller without credentials, where none are required: may do anything."""

    name = "anonymous"
    problem: tuple[str, str] | None = None

    def allows(self, action: str, resource: str) -> bool:
        return True


class Authenticator:
    """Verifies a request's credentials."""

    async def caller(self, request: Request) -> Anyone:
        return Anyone()
