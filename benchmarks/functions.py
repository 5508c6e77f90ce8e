"""The handler files the benchmarks run: plain Lambda handlers, written into a fresh handler directory.

Process isolation is eventfn's default, so process-isolated functions carry no `isolation` key at all;
in-process ones say `isolation = "inprocess"`, and an `eventfn serve` that does not know the key yet marks
them Failed (the harness then reports in-process figures as not available).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from eventfn.testing import write_handler

PROCESS = "process"
INPROCESS = "inprocess"

NO_OP = """
    # /// eventfn
    # description = "Does nothing: the benchmarks' drain and sync-invoke function."
    {settings}
    # ///
    def handler(event, context):
        return None
"""

#: Notes when the handler received each event (taken first), beside the publish time the event carries, as
#: one line appended to a file of its own process. Not the NATS probe: a report per event over NATS adds a
#: round trip per invocation at the very rate being measured, and the probe's one socket per process is not
#: safe for in-process handlers, which run on several threads at once (one thread takes another's PONG).
#: An O_APPEND write of one short line is atomic and costs a few microseconds.
REPORTER = """
    # /// eventfn
    # description = "Notes publish and receive times for the harness."
    {settings}
    # ///
    import json
    import os
    import time

    _out = os.open("{reports}/%d.txt" % os.getpid(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


    def handler(event, context):
        received = time.time()
        if isinstance(event, dict) and "Records" in event:
            stamps = [json.loads(record["body"])["ts"] for record in event["Records"]]
        elif isinstance(event, dict) and "ts" in event:
            stamps = [event["ts"]]
        else:
            return None  # a warm-up invoke
        os.write(_out, ("".join("%r %r\\n" % (ts, received) for ts in stamps)).encode())
"""

#: Returns its version, so a poller sees when new code serves.
VERSIONED = """
    # /// eventfn
    {settings}
    # ///
    def handler(event, context):
        return {{"version": {version}}}
"""


def settings_block(
    *,
    isolation: str = PROCESS,
    subject: str | None = None,
    batch_size: int = 1,
    enabled: bool = True,
    min_warm: int | None = None,
    idle_timeout: float | None = None,
) -> str:
    """The TOML lines of a function's inline settings block (each already commented). `min_warm` and
    `idle_timeout` are written only when given: otherwise the code under test's defaults hold."""
    lines = []
    if isolation != PROCESS:
        lines.append(f'isolation = "{isolation}"')
    if min_warm is not None:
        lines.append(f"min_warm = {min_warm}")
    if idle_timeout is not None:
        lines.append(f"idle_timeout = {idle_timeout}")
    if subject is not None:
        trigger = f'subjects = ["{subject}"], batch_size = {batch_size}'
        if not enabled:
            trigger += ", enabled = false"
        lines.append(f"triggers = [{{ {trigger} }}]")
    return "\n    ".join(f"# {line}" for line in lines) or "#"


def handler_dir(path: Path) -> Path:
    """A fresh handler directory."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def no_op(directory: Path, name: str, settings: str) -> None:
    """A no-op function with `settings` (from `settings_block`)."""
    write_handler(directory, name, NO_OP.format(settings=settings))


def reporter(directory: Path, name: str, reports: Path, settings: str) -> None:
    """A function with `settings` that notes each event's publish and receive times in `reports/`."""
    reports.mkdir(parents=True, exist_ok=True)
    write_handler(directory, name, REPORTER.format(settings=settings, reports=reports))


def read_reports(reports: Path) -> list[tuple[float, float]]:
    """(published, received) of every event noted in `reports/` so far."""
    pairs = []
    for path in reports.glob("*.txt"):
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                published, received = line.split()
                pairs.append((float(published), float(received)))
    return pairs


def place_versioned(directory: Path, name: str, version: int, settings: str) -> None:
    """Make `directory/<name>.py` appear (or change) at once: written aside, then renamed into place."""
    aside = directory.parent / f".{name}.py.new"
    source = textwrap.dedent(VERSIONED.format(version=version, settings=settings)).lstrip()
    aside.write_text(source, encoding="utf-8")
    os.replace(aside, directory / f"{name}.py")
