"""`eventfn queue`: queues: ls, stats, send, purge, redrive."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from eventfn.broker.bus import Bus
from eventfn.config import ServiceConfig

Connect = Callable[[ServiceConfig], AbstractAsyncContextManager[Bus]]


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the `queue` command and its actions to the CLI's parser."""
    parser = commands.add_parser("queue", help="queues: ls, stats, send, purge, redrive")
    common(parser)
    parser.add_subparsers(dest="queue_command", required=True, metavar="ACTION")


async def run(config: ServiceConfig, args: argparse.Namespace, connect: Connect) -> int:
    """Run the action `args` names; returns the exit code."""
    raise NotImplementedError
