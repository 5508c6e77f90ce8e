"""Invocation: functions, their concurrency slots, worker pools and isolation, the worker runtime and its wire
protocol, and the per-invocation log. `Functions.invoke(name, Invocation) -> Outcome` (`invoke.functions`) is the
one transport-neutral call every front and every mapping uses; pools only `execute` a run."""
