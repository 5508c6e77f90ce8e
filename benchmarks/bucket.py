"""`python -m benchmarks.bucket [--quick] [--out DIR]`: the bucket watcher, beside watchfiles alone in the same run.

1. File-to-handler latency: one small file at a time is written (and closed) into a bucket; the handler notes when
   its event arrives. The ceiling: how long watchfiles itself, with the watcher's settings (50 ms debounce, 20 ms
   step), takes to report a file written the same way into a folder of its own.
2. A burst of 10,000 small files written as fast as one thread can into one bucket folder: events announced per
   second (stored in JetStream) and handled per second (batches of up to 100), against the files per second
   watchfiles alone reports for the same burst.

Starts its own nats-server and one `eventfn serve` (default settings, process isolation). Writes `bucket.json`
and `bucket.md` into DIR (default: benchmarks/results); the table also goes to stdout.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import nats
from watchfiles import Change, awatch

from benchmarks import report
from benchmarks.harness import percentile
from benchmarks.report import Row, Target, evaluate
from eventfn.testing import NatsServer, Serve, write_handler

#: What the watcher uses (`[buckets] debounce` default, and its step): the baseline gets the same.
DEBOUNCE_MS, STEP_MS = 50, 20

REPORTER = """
    # /// eventfn
    # triggers = [{{ type = "bucket", bucket = "{bucket}", batch_size = {batch} }}]
    # ///
    import os
    import time

    _out = os.open("{reports}/%d.txt" % os.getpid(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


    def handler(event, context):
        received = time.time()
        os.write(_out, "".join("%s %r\\n" % (r["s3"]["object"]["key"], received) for r in event["Records"]).encode())
"""


def received(reports: Path) -> dict[str, float]:
    """When the handler received each key, from its processes' files."""
    found: dict[str, float] = {}
    for path in reports.glob("*.txt"):
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                key, when = line.split()
                found.setdefault(key, float(when))
    return found


def arrivals(reports: Path) -> Callable[[], dict[str, float]]:
    """A function that reads `received(reports)` afresh."""
    return lambda: received(reports)


def write(path: Path, data: bytes) -> float:
    """Write and close `path`; returns the time the write was complete."""
    with open(path, "wb") as f:
        f.write(data)
    return time.time()


async def wait_for(check: Callable[[], bool], *, timeout: float, interval: float = 0.002) -> None:
    with anyio.fail_after(timeout):
        while not check():  # noqa: ASYNC110 - files written by another process: nothing to await
            await anyio.sleep(interval)


class Plain:
    """watchfiles alone on a folder: when each path was first reported."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen: dict[str, float] = {}
        self.stop = anyio.Event()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        started = False
        async for changes in awatch(
            self.folder,
            watch_filter=None,
            debounce=DEBOUNCE_MS,
            step=STEP_MS,
            stop_event=self.stop,
            rust_timeout=100,
            yield_on_timeout=True,
            recursive=False,
        ):
            now = time.time()
            if not started:
                started = True
                task_status.started()
            for change, path in changes:
                if change == Change.added:
                    self.seen.setdefault(Path(path).name, now)


async def latency(samples: int, folder: Path, arrived: Callable[[], dict[str, float]], tag: str) -> list[float]:
    """Seconds from each file's write to its arrival, one file at a time."""
    out = []
    for i in range(samples):
        name = f"{tag}{i:05d}.txt"
        written = write(folder / name, b"x" * 100)
        await wait_for(lambda n=name: n in arrived(), timeout=30)  # type: ignore[misc]
        out.append(arrived()[name] - written)
        await anyio.sleep(0.01)
    return out


async def burst(files: int, folder: Path, arrived: Callable[[], dict[str, float]], tag: str) -> dict[str, float]:
    """Write `files` files as fast as one thread can; when all were written, and when all arrived."""
    names = [f"{tag}{i:05d}.txt" for i in range(files)]

    def write_all() -> float:
        for name in names:
            write(folder / name, b"burst file\n")
        return time.time()

    began = time.time()
    written = await anyio.to_thread.run_sync(write_all)
    await wait_for(lambda: len(arrived()) >= files, timeout=600, interval=0.05)
    times = arrived()
    return {"began": began, "written": written, "last": max(times[n] for n in names)}


async def stored(nc: nats.aio.client.Client, subjects: str) -> int:
    info = await nc.jetstream().stream_info("EVENTFN", subjects_filter=subjects)
    return sum((info.state.subjects or {}).values())


async def run(work: Path, url: str, samples: int, files: int) -> dict[str, Any]:
    root, reports, handlers = work / "buckets", work / "reports", work / "handlers"
    for path in (root / "plain", reports / "lat", reports / "burst", handlers):
        path.mkdir(parents=True)
    for name, batch in (("lat", 1), ("burst", 100)):
        code = REPORTER.format(bucket=name, batch=batch, reports=reports / name)
        write_handler(handlers, f"bucket_{name}", code)
    config = work / "eventfn.toml"
    config.write_text(f'[buckets]\nroot = "{root}"\n')
    serve = Serve(handlers, url, work / "data", extra_args=["--config", str(config)])
    await serve.astart()
    nc = await nats.connect(url)
    try:
        await serve.log.await_line(r"bucket watcher: watching 2 bucket")
        lat = arrivals(reports / "lat")
        await latency(3, root / "lat", lat, "warm")  # workers warm, the first folder events out of the way
        plain = Plain(root / "plain")
        async with anyio.create_task_group() as tg:
            await tg.start(plain.run)
            sys.stderr.write(f"latency: {samples} files, watchfiles alone ...\n")
            notice = await latency(samples, root / "plain", lambda: plain.seen, "p")
            sys.stderr.write(f"latency: {samples} files through eventfn ...\n")
            handled = await latency(samples, root / "lat", lat, "s")
            sys.stderr.write(f"burst: {files} files, watchfiles alone ...\n")
            plain.seen.clear()
            plain_burst = await burst(files, root / "plain", lambda: plain.seen, "b")
            plain.stop.set()
        sys.stderr.write(f"burst: {files} files through eventfn ...\n")
        before = await stored(nc, "eventfn.source.bucket.burst.>")
        published: dict[str, float] = {}

        async def watch_stored() -> None:
            with anyio.fail_after(600):
                while await stored(nc, "eventfn.source.bucket.burst.>") - before < files:  # noqa: ASYNC110
                    await anyio.sleep(0.05)  # the stream's state has no event to await
            published["last"] = time.time()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_stored)
            ours = await burst(files, root / "burst", arrivals(reports / "burst"), "b")
    finally:
        await nc.close()
        await serve.astop()
    return {
        "latency": {"watchfiles": notice, "eventfn": handled},
        "burst": {"files": files, "watchfiles": plain_burst, "eventfn": ours, "published": published["last"]},
    }


def rows(raw: dict[str, Any]) -> list[Row]:
    notice, handled = raw["latency"]["watchfiles"], raw["latency"]["eventfn"]
    out = []
    for p in (50, 99):
        out.append(
            Row(
                scenario="bucket latency",
                what=f"file written to handler, p{p}",
                figure=percentile(handled, p) * 1e3,
                unit="ms",
                ceiling=percentile(notice, p) * 1e3,
                ceiling_what="watchfiles alone notices the file",
                target=Target(text="within 2x watchfiles", rule="ratio_at_most", bound=2.0) if p == 50 else None,
            )
        )
    b = raw["burst"]
    files = b["files"]
    plain_rate = files / (b["watchfiles"]["last"] - b["watchfiles"]["began"])
    for what, end in (("events announced (stored)", b["published"]), ("events handled", b["eventfn"]["last"])):
        out.append(
            Row(
                scenario=f"bucket burst of {files:,} files",
                what=what,
                figure=files / (end - b["eventfn"]["began"]),
                unit="events/s",
                ceiling=plain_rate,
                ceiling_what="files/s watchfiles alone reports",
                note=f"files written at {files / (b['eventfn']['written'] - b['eventfn']['began']):,.0f}/s",
            )
        )
    return [evaluate(r) for r in out]


def markdown(table: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        "# eventfn bucket watcher benchmark",
        "",
        f"{meta['date']} · {meta['machine']} · Python {meta['python']} · {meta['samples']} latency samples",
        "",
        "| scenario | figure | ceiling (same run) | ratio |",
        "|---|---|---|---|",
    ]
    for r in table:
        unit = r.unit
        figure = f"{r.figure:,.1f} {unit}" if unit == "ms" else f"{r.figure:,.0f} {unit}"
        ceiling = f"{r.ceiling:,.1f} {unit}" if unit == "ms" else f"{r.ceiling:,.0f} files/s"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "—"
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.scenario} · {r.what}{note} | {figure} | {ceiling} ({r.ceiling_what}) | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bucket", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer latency samples (the burst stays 10,000)")
    parser.add_argument("--samples", type=int, default=None, help="latency samples (default 200, quick 50)")
    parser.add_argument("--files", type=int, default=10_000, help="files in the burst")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where results go")
    args = parser.parse_args()
    samples = args.samples or (50 if args.quick else 200)
    work = Path(tempfile.mkdtemp(prefix="eventfn-bench-bucket-"))
    try:
        with NatsServer(work / "nats") as server:
            raw = anyio.run(run, work, server.url, samples, args.files)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = rows(raw)
    meta = report.run_meta(samples=samples)
    report.save(args.out, "bucket", {"meta": meta, "rows": table}, markdown(table, meta))


if __name__ == "__main__":
    main()
