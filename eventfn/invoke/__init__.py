"""Invocation: functions, their concurrency slots, worker pools and isolation, the worker runtime and its wire
protocol, and the per-invocation log. `invoke.invocation.invoke` is the one transport-neutral call every front
and every mapping uses."""
