"""Results: one row per figure, with its ceiling from the same run, the ratio, and the issue's target.

Written as `results.json` (everything, including the raw measurements), `results.md` (the table) and
`results.png` (throughput and latency, matplotlib's Agg backend: no display needed).
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Literal

import msgspec

#: How a target reads a row: the ratio at least / at most a bound, or the figure itself at most a bound.
Rule = Literal["ratio_at_least", "ratio_at_most", "figure_at_most"]


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """A target from the issue, as text and as a bound to check."""

    text: str
    rule: Rule
    bound: float


class Row(msgspec.Struct, kw_only=True):
    """One figure of one scenario."""

    scenario: str
    what: str
    figure: float | None  # None: not measured (the reason is in `note`)
    unit: str
    ceiling: float | None = None
    ceiling_what: str = ""
    target: Target | None = None
    note: str = ""
    #: Filled in by `evaluate`.
    ratio: float | None = None
    verdict: str = ""


def evaluate(row: Row) -> Row:
    """Fill in the ratio to the ceiling and whether the target is met (or by how much it falls short)."""
    if row.figure is not None and row.ceiling:
        row.ratio = row.figure / row.ceiling
    target = row.target
    if row.figure is None:
        row.verdict = "not available" if target else ""
        return row
    if target is None:
        return row
    value = row.figure if target.rule == "figure_at_most" else row.ratio
    if value is None:
        row.verdict = "no ceiling"
    elif target.rule == "ratio_at_least":
        row.verdict = "met" if value >= target.bound else f"short by {100 * (1 - value / target.bound):.0f}%"
    else:
        row.verdict = "met" if value <= target.bound else f"short: {100 * (value / target.bound - 1):.0f}% over"
    return row


#: What a reader of the table needs to know to trust (or question) it.
METHOD = [
    "Every contender is its own process on one nats-server (JetStream, file store, loopback): the raw nats-py "
    "ceiling, FastStream 0.7 and `eventfn serve` (default settings: INFO log, concurrency 10); load "
    "generators are processes of their own too.",
    "Drain: the events are preloaded on one subject of eventfn's stream; every contender has a durable consumer "
    "on it, created paused. The clock starts at the resume (plus one event on a subject only that consumer "
    "takes, because nats-server leaves pull requests that waited through a pause unserved) and stops when the "
    "consumer's ack floor passes the last preloaded event, polled every 10 ms. eventfn's workers are warmed "
    "first (10 concurrent sync invokes). The ceiling runs three times (first, middle, last); its median counts.",
    "Ceiling consumer: a raw inbox subscription with two pull requests of 500 kept outstanding, a new one as "
    "soon as one batch is used up, an ack per message. FastStream: `PullSub(batch_size=100)` per message, "
    "`batch=True` batched, access log off.",
    "Latency: plain publishes at a fixed rate from a separate process, each event carrying its publish time; the "
    "handler notes its receive time (first thing it does) in a file of its own process, the ceiling consumer "
    "in memory. A NATS report per event would add a round trip per invocation at the rate being measured.",
    "CPU per event: utime + stime from /proc/<pid>/stat over the span each figure is measured (a drain from the "
    "resume to the last ack, a latency run from the first publish to the last event reported, sync invoke over the "
    "counted span), divided by the events (round trips) in it. `eventfn serve` is split into the service process "
    "and its workers: every descendant process, looked at every 0.1 s, with workers that exited counted through "
    "their parent's cutime + cstime (or as last seen). The ceiling, FastStream and nats-server: their own process. "
    "Clock ticks are 10 ms: a short span's figure is rounded by up to one tick.",
    "Warm workers: process-isolated functions of the drain, latency and sync scenarios set `min_warm = 10` (their "
    "concurrency) and are warmed with 10 concurrent invokes before the clock starts; the scale-up latency variant "
    "sets `min_warm = 0` and is not warmed (its workers before and after are noted).",
    "Sync invoke: 8 clients on their own connections, back-to-back requests, 1 s warm-up. Cold start: a "
    "handler file renamed into the watched directory, then requests every 5 ms until it answers; hot "
    "reload: the same for a changed file until the new version answers. Memory: VmRSS from /proc.",
]


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit in ("events/s", "req/s"):
        return f"{value:,.0f} {unit}"
    if unit == "ms":
        return f"{value:,.1f} ms" if value < 100 else f"{value:,.0f} ms"
    if unit == "MB":
        return f"{value:,.1f} MB"
    if unit == "processes":
        return f"{value:,.0f} {unit}"
    if unit == "x":
        return f"{value:.2f}x"
    if unit.startswith("µs/") or unit in ("s", "ms CPU/s"):
        return f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"
    return f"{value:,.3g} {unit}"


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    """The results table, with the run's conditions above it."""
    out = [
        f"# eventfn benchmarks ({meta['mode']} run)",
        "",
        f"{meta['date']} · eventfn {meta['eventfn']} · {meta['machine']} · Python {meta['python']} · "
        f"nats-server {meta['nats_server']} · "
        f"nats-py {meta['nats_py']} · FastStream {meta['faststream']} · {meta['events']:,} events of "
        f"{meta['event_bytes']} bytes · total {meta['seconds']:.0f} s · CPUs {100 * meta['busy_before']:.0f}% busy "
        "with other work before the run",
        "",
        "Ratios compare figures from this one run only. Latency and memory ratios are figure / ceiling (lower "
        "is better); throughput ratios likewise (higher is better).",
        "",
        *table(rows),
    ]
    out += ["", "How it was measured:", "", *(f"- {line}" for line in METHOD), ""]
    return "\n".join(out)


def table(rows: list[Row]) -> list[str]:
    """Markdown lines: each row's figure beside its ceiling, their ratio, the target and whether it is met."""
    out = [
        "| scenario | figure | ceiling (same run) | ratio | target (issue 13, else 5) | met / short |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        figure = _number(row.figure, row.unit) if row.figure is not None else f"not available: {row.note}"
        ceiling = f"{_number(row.ceiling, row.unit)} ({row.ceiling_what})" if row.ceiling is not None else "—"
        ratio = "—" if row.ratio is None else (f"{100 * row.ratio:.0f}%" if row.ratio < 2 else f"{row.ratio:.1f}x")
        target = row.target.text if row.target else ""
        note = f" ({row.note})" if row.note and row.figure is not None else ""
        out.append(f"| {row.scenario} · {row.what}{note} | {figure} | {ceiling} | {ratio} | {target} | {row.verdict} |")
    return out


def machine() -> str:
    """A one-line description of this machine."""
    cores = len(os.sched_getaffinity(0))
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cores} cores{' ' + model if model else ''}, {platform.system()} {platform.release()}"


class Bar(msgspec.Struct, frozen=True):
    """One bar of the chart: `kind` is ceiling, eventfn or peer; `panel` groups bars into a plot."""

    panel: str
    label: str
    value: float | None
    kind: str


_COLORS = {"ceiling": "#8c8c8c", "eventfn": "#1f77b4", "peer": "#ff7f0e"}


def _panel(ax: Any, bars: list[Bar], panels: list[str], title: str, unit: str) -> None:
    """Horizontal bars, one group per contender, one bar per panel in `panels` (e.g. p50 and p99)."""
    labels: list[str] = []
    for bar in bars:
        if bar.panel in panels and bar.label not in labels:
            labels.append(bar.label)
    height = 0.8 / len(panels)
    for k, panel in enumerate(panels):
        values = {b.label: b for b in bars if b.panel == panel}
        for i, label in enumerate(labels):
            bar = values.get(label)
            if bar is None:
                continue
            y = i + (k - (len(panels) - 1) / 2) * height
            value = bar.value if bar.value is not None and not math.isnan(bar.value) else 0.0
            alpha = 1.0 if len(panels) == 1 else 0.45 + 0.55 * k / (len(panels) - 1)
            ax.barh(y, value, height=height * 0.95, color=_COLORS[bar.kind], alpha=alpha)
            text = "n/a" if bar.value is None else (f"{value:,.0f}" if unit != "ms" else f"{value:.2f}")
            suffix = f" {panel.split()[-1]}" if len(panels) > 1 else ""
            ax.text(value, y, f" {text}{suffix}", va="center", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(unit)
    ax.margins(x=0.18)


def cpu_busy(seconds: float = 0.5) -> float:
    """The share of all CPUs busy over the next `seconds` (from /proc/stat): other work skews every figure."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(1, total1 - total0)


def chart(bars: list[Bar], path: Path) -> None:
    """Throughput (drain, sync invoke) and latency (end to end, sync invoke) side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    _panel(axes[0][0], bars, ["drain"], "1. drain a preloaded backlog: events/s (no-op handler)", "events/s")
    _panel(axes[0][1], bars, ["latency p50", "latency p99"], "2. publish-to-handler latency at 2,000/s", "ms")
    _panel(axes[1][0], bars, ["sync req/s"], "3. sync invoke, 8 clients: round trips/s", "req/s")
    _panel(axes[1][1], bars, ["sync ms p50", "sync ms p99"], "3. sync invoke, 8 clients: latency", "ms")
    fig.suptitle("eventfn beside the raw nats-py ceiling (grey) and FastStream (orange), one run", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summarized(value: Any) -> Any:
    """`value` with every long list of numbers (latency samples) replaced by its distribution."""
    if isinstance(value, dict):
        return {k: _summarized(v) for k, v in value.items()}
    if isinstance(value, list) and len(value) > 100 and all(isinstance(v, float | int) for v in value):
        ordered = sorted(value)

        def at(p: float) -> float:
            return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

        return {
            "count": len(ordered),
            "mean": sum(ordered) / len(ordered),
            **{f"p{p:g}": at(p) for p in (0, 50, 90, 99, 99.9)},
            "max": ordered[-1],
        }
    return value


def write(rows: list[Row], bars: list[Bar], meta: dict[str, Any], raw: dict[str, Any], out: Path) -> None:
    """Write results.json, results.md and results.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "rows": rows, "raw": _summarized(raw)}
    (out / "results.json").write_bytes(msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n")
    (out / "results.md").write_text(markdown(rows, meta), encoding="utf-8")
    chart(bars, out / "results.png")


def ratio_table(rows: list[Row], *, percent: bool = False, decimals: int = 0) -> list[str]:
    """A benchmark's result table as markdown lines: scenario, figure, the same run's ceiling, and their ratio (as
    a percentage, or as a factor)."""
    lines = ["| scenario | figure | ceiling (same run) | ratio |", "|---|---|---|---|"]
    for r in rows:
        if r.ratio is None:
            ratio = "—"
        else:
            ratio = f"{100 * r.ratio:.0f}%" if percent else f"{r.ratio:.2f}x"
        note = f" ({r.note})" if r.note else ""
        ceiling = f"{r.ceiling:,.{decimals}f} {r.unit} ({r.ceiling_what})" if r.ceiling else "—"
        lines.append(f"| {r.scenario} · {r.what}{note} | {r.figure:,.{decimals}f} {r.unit} | {ceiling} | {ratio} |")
    return lines


def save(out: Path, name: str, results: dict[str, Any], text: str) -> None:
    """Write a benchmark's results, `<name>.json` (everything) and `<name>.md` (`text`), and print the text."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_bytes(msgspec.json.format(msgspec.json.encode(results)))
    (out / f"{name}.md").write_text(text)
    print(text)


def run_meta(**extra: Any) -> dict[str, Any]:
    """What every result file says of its run: when, on what machine and Python, with how many CPUs; plus `extra`."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "python": ".".join(map(str, sys.version_info[:3])),
        **extra,
        "cpus": os.cpu_count(),
    }
