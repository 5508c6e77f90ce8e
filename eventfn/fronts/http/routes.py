"""The routes functions declare (`type = "http"` triggers), matched as API Gateway's HTTP APIs match them.

A route's path has literal segments, `{name}` segments (one segment, a path parameter) and a last `{name+}` (one
or more segments, the rest of the path). Where several routes match a path, the most specific wins, segment by
segment (a literal before a parameter before a greedy one), and a route that lists the request's method before
one that takes any. Two routes of the same shape and method conflict: the one of the function first by name (then
by trigger order) keeps it, and `build` says so for the log.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from eventfn.config import HttpTrigger
from eventfn.errors import ConfigError
from eventfn.fronts.http.url_events import path_parameter
from eventfn.invoke.functions import Function

_ANY = "ANY"


class Route:
    """One declared route of one function."""

    __slots__ = ("function", "greedy", "methods", "path", "rank", "segments", "shape", "trigger", "trigger_name")

    def __init__(self, function: str, trigger: HttpTrigger, trigger_name: str) -> None:
        self.function = function
        self.trigger = trigger
        self.trigger_name = trigger_name
        self.path = trigger.path
        #: Upper-case; empty: any method.
        self.methods = frozenset(m.upper() for m in trigger.methods)
        parts = _split(trigger.path)
        self.greedy: str | None = None
        if parts and parts[-1].endswith("+}"):
            self.greedy = parts.pop()[1:-2]
        #: (literal, None) or (None, parameter name), for the segments before a greedy one.
        self.segments: list[tuple[str | None, str | None]] = [
            (None, p[1:-1]) if p.startswith("{") else (p, None) for p in parts
        ]
        rank = [2 if literal is not None else 1 for literal, _ in self.segments]
        if self.greedy is not None:
            rank.append(0)
        rank.append(1 if self.methods else 0)
        self.rank = tuple(rank)
        self.shape = "/" + "/".join(
            [literal if literal is not None else "{}" for literal, _ in self.segments]
            + (["{+}"] if self.greedy is not None else [])
        )

    def match(self, parts: list[str]) -> dict[str, str] | None:
        """The path parameters if the path (split into segments) is this route's, else None."""
        count = len(self.segments)
        if len(parts) < count or (len(parts) > count and self.greedy is None):
            return None
        params: dict[str, str] = {}
        for (literal, name), part in zip(self.segments, parts, strict=False):
            if literal is not None:
                if part != literal:
                    return None
            elif not part:
                return None
            else:
                assert name is not None
                params[name] = path_parameter(part)
        if self.greedy is not None:
            rest = parts[count:]
            if not rest or not all(rest):
                return None
            params[self.greedy] = path_parameter("/".join(rest))
        return params

    def allows(self, method: str) -> bool:
        return not self.methods or method in self.methods

    def route_key(self, method: str) -> str:
        """API Gateway's `routeKey`: `GET /orders/{id}`, or `ANY /orders/{id}` for a route of any method."""
        return f"{method if self.methods else _ANY} {self.path}"

    def describe(self) -> str:
        methods = ",".join(sorted(self.methods)) or _ANY
        return f"{methods} {self.path} of function {self.function} (trigger {self.trigger_name})"


class Found:
    """A path's route: the one that takes the request's method (`route`, with `params`), or None, the methods the
    path's routes take (`allowed`: a 405) and those routes (`matched`: a CORS preflight is theirs to answer)."""

    __slots__ = ("allowed", "matched", "params", "route")

    def __init__(
        self,
        route: Route | None,
        params: dict[str, str],
        allowed: frozenset[str] = frozenset(),
        matched: tuple[Route, ...] = (),
    ) -> None:
        self.route = route
        self.params = params
        self.allowed = allowed
        self.matched = matched


class RouteTable:
    """The routes of all functions, matched by path and method."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self.routes = sorted(routes, key=lambda r: r.rank, reverse=True)  # the most specific first

    def __len__(self) -> int:
        return len(self.routes)

    def find(self, path: str, method: str) -> Found | None:
        """The route of `path` (raw) for `method`; None if no route has this path."""
        if not self.routes:
            return None
        parts = _split(path)
        matched: list[Route] = []
        for route in self.routes:
            params = route.match(parts)
            if params is None:
                continue
            if route.allows(method):
                return Found(route, params)
            matched.append(route)
        if not matched:
            return None
        return Found(None, {}, frozenset().union(*(r.methods for r in matched)), tuple(matched))


def _split(path: str) -> list[str]:
    stripped = path.strip("/")
    return stripped.split("/") if stripped else []


def build(functions: Mapping[str, Function]) -> tuple[RouteTable, list[str]]:
    """The route table of `functions`' http triggers, and the conflicts left out of it (one message each)."""
    taken: dict[tuple[str, str], Route] = {}
    routes: list[Route] = []
    problems: list[str] = []
    for name in sorted(functions):
        settings = functions[name].routing_settings
        if settings is None:
            continue
        try:
            triggers = settings.trigger_list()
        except ConfigError:  # reported where the settings were read; the function has no routes meanwhile
            continue
        for index, trigger in enumerate(triggers):
            if not isinstance(trigger, HttpTrigger):
                continue
            route = Route(name, trigger, trigger.name or f"t{index}")
            keys = [(route.shape, m) for m in (route.methods or {_ANY})]
            clash = next((taken[k] for k in keys if k in taken), None)
            if clash is not None:
                problems.append(
                    f"route {route.describe()} conflicts with route {clash.describe()}: function {clash.function} "
                    f"serves it (the first by name); change one route's path or methods"
                )
                continue
            for key in keys:
                taken[key] = route
            routes.append(route)
    return RouteTable(routes), problems
