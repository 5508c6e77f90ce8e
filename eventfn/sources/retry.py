"""The retry policy as one pure function: (outcome, attempt, age, policy) -> ack, retry after a delay, or
dead-letter. The dispatcher applies it: an unordered mapping hands a retry back to its source with a delay (no
worker waits); an ordered one holds the event, and its key, until the delay has passed."""

from __future__ import annotations

import random
from collections.abc import Callable

import msgspec

from eventfn.config import RetryPolicy


class Ack(msgspec.Struct, frozen=True):
    """Done: acknowledge."""


class Retry(msgspec.Struct, frozen=True):
    """Deliver again after `delay` seconds."""

    delay: float


class DeadLetter(msgspec.Struct, frozen=True):
    """Give up: write a failure record to the DLQ, then acknowledge. `condition` uses Lambda's names."""

    condition: str


Decision = Ack | Retry | DeadLetter


def backoff(attempt: int, policy: RetryPolicy, rand: Callable[[], float] = random.random) -> float:
    """Delay before retry number `attempt` (1-based): exponential, capped, with equal jitter in [d/2, d]."""
    # The exponent is bounded first: 2 ** 1024 does not fit a float, and the cap is reached long before.
    delay = min(policy.max_delay, policy.base_delay * 2.0 ** min(attempt - 1, 64))
    return delay / 2 + rand() * delay / 2


def decide(
    ok: bool, attempt: int, age: float, policy: RetryPolicy, rand: Callable[[], float] = random.random
) -> Decision:
    """What to do after invocation number `attempt` (1-based) of an event `age` seconds old."""
    if ok:
        return Ack()
    if age >= policy.max_event_age:
        return DeadLetter("EventAgeExceeded")
    if attempt > policy.max_attempts:
        return DeadLetter("RetriesExhausted")
    return Retry(backoff(attempt, policy, rand))
