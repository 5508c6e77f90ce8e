"""eventfn: a self-hosted, AWS-Lambda-like event platform on NATS JetStream.

Kept import-light on purpose: every worker process imports this package before the user's handler, so
only the error types are re-exported here; everything else lives in the module named for its concern.
"""

from __future__ import annotations

from eventfn.errors import (
    ConfigError,
    EventDecodeError,
    EventfnError,
    HandlerLoadError,
    NatsUnavailable,
    ServiceUnavailable,
    UnreadableData,
)

__all__ = [
    "ConfigError",
    "EventDecodeError",
    "EventfnError",
    "HandlerLoadError",
    "NatsUnavailable",
    "ServiceUnavailable",
    "UnreadableData",
]
__version__ = "0.1.0"
