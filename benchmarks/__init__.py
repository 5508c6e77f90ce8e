"""eventfn's benchmark harness (issues 5 and 13): eventfn beside the raw nats-py ceiling and FastStream, in one run.

    pip install -e '.[bench]'
    python -m benchmarks --quick          # about a minute on 2 cores
    python -m benchmarks                  # the issue's sizes, a few minutes

Modules, one concern each: `__main__` (the run), `scenarios` (drain, latency, sync invoke), `lifecycle`
(cold start, hot reload, memory), `stream` (the events and the drain clock), `ceiling` (raw nats-py),
`peer` (FastStream), `load` (publisher and requesters), `functions` (the handler files), `child` (the
measured processes), `cpu` (CPU time of a process tree from /proc), `harness` (shared state and helpers),
`report` (JSON, Markdown, PNG). Runs of their own: `idle` (what N idle functions cost, cold starts), `bucket`,
`queues`, `shards`, `http`.
Figures are benchmark results, never test assertions: nothing here is imported by `tests/`.
"""
