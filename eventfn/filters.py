"""Event filtering for event source mappings: Lambda's `FilterCriteria`, compiled once, matched per event.

A mapping has up to five patterns (Lambda's `Filters[].Pattern`), each a JSON string or, from TOML, a table.
An event passes when any pattern matches the document built for it. Within a pattern:

- an object names keys; every key must match (AND), and a nested object matches a nested object;
- a leaf is a non-empty list of alternatives (OR): a string, number, true, false, null, or one operator:
  `{"prefix": "us-"}`, `{"suffix": ".jpg"}`, `{"anything-but": value | [values]}`,
  `{"anything-but": {"prefix" | "suffix": text | [texts]}}`, `{"numeric": [">", 10, "<=", 20]}`,
  `{"exists": true | false}`. `suffix` and the prefix/suffix forms of `anything-but` are EventBridge's (Lambda's
  table lists `prefix` only); a list in the latter is an eventfn extension: none of them;
- a key missing from the document fails, unless its leaf allows `{"exists": false}`; a pattern naming keys
  under a value that is not an object (a plain-text body, say) does not match;
- where the document holds a list, the pattern matches if any element does (EventBridge's array rule).

Numbers are matched exactly by their JSON text, as Lambda does: 300, 300.0 and 3.0e2 are three different
values (`numeric` compares them as numbers). A document decoded with `decode_body` keeps each number's text;
one decoded by another JSON library keeps only the value, so 3.0e2 arrives as 300.0. The same goes for TOML
patterns: TOML has no number text, so write `300.0`, not `3.0e2`, there.

Everything is checked by `compile_filters`, so `Filter.matches` never raises.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NoReturn

from eventfn import decoding
from eventfn.errors import ConfigError

#: Lambda's default quota of filters per event source mapping.
MAX_PATTERNS: Final = 5

_OPERATORS: Final = ("anything-but", "exists", "numeric", "prefix", "suffix")
_LOWER: Final = frozenset({">", ">="})
_UPPER: Final = frozenset({"<", "<="})
_COMPARISONS: Final = ("=", "<", "<=", ">", ">=")
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_EXAMPLE: Final = '{"body": {"amount": [{"numeric": [">", 100]}]}}'

#: Stands for a key the document does not have (None would be a JSON null).
_MISSING: Final = object()

_Check = Callable[[object], bool]


class Filter:
    """A mapping's compiled filter criteria. Build it with `compile_filters`; `Filter()` passes every event."""

    __slots__ = ("_matchers", "patterns")

    def __init__(self, _matchers: Sequence[_Object] = (), _patterns: Sequence[dict[str, Any]] = ()) -> None:
        self._matchers = tuple(_matchers)
        #: The patterns as parsed, for display.
        self.patterns: tuple[dict[str, Any], ...] = tuple(_patterns)

    @property
    def matches_everything(self) -> bool:
        """True when there are no patterns, so a caller can skip building the document."""
        return not self._matchers

    @property
    def keys(self) -> frozenset[str]:
        """The document's top-level keys that some pattern names (a caller can skip decoding the others)."""
        return frozenset(key for matcher in self._matchers for key, _ in matcher.fields)

    def matches(self, document: Mapping[str, Any]) -> bool:
        """True if any pattern matches `document` (a JSON-shaped dict), or if there are no patterns."""
        if not self._matchers:
            return True
        for matcher in self._matchers:
            if matcher.match_fields(document):
                return True
        return False

    def __repr__(self) -> str:
        return f"Filter({list(self.patterns)!r})"


def compile_filters(patterns: Sequence[str | Mapping[str, Any]], where: str) -> Filter:
    """Check and compile filter patterns (JSON strings or parsed objects); errors name `where` and a JSON path."""
    if isinstance(patterns, str | Mapping):
        raise ConfigError(where, "filters must be a list of patterns", f"write filters = [{_EXAMPLE!r}]")
    if len(patterns) > MAX_PATTERNS:
        raise ConfigError(
            where,
            f"{len(patterns)} filter patterns, more than Lambda's limit of {MAX_PATTERNS}",
            "merge patterns: each leaf is already a list of alternatives",
        )
    matchers: list[_Object] = []
    sources: list[dict[str, Any]] = []
    for index, pattern in enumerate(patterns):
        compiler = _Compiler(where, f"patterns[{index}]")
        try:
            source = compiler.parse(pattern)
            matchers.append(compiler.compile_object(source, "$", top=True))
        except RecursionError as exc:
            raise ConfigError(where, f"patterns[{index}] is nested too deeply", "a filter needs a few levels") from exc
        sources.append(source)
    return Filter(matchers, sources)


def decode_body(data: bytes | str) -> Any:
    """The body as patterns see it: its JSON value with each number's text kept, or the text if it is not JSON.

    For filtering only: decoded floats are a float subclass that some encoders (msgspec) refuse. Never raises:
    a body that is not JSON eventfn can parse (invalid, not UTF-8, nested too deeply) is matched as text.
    """
    try:
        return _loads(data)
    except decoding.ERRORS:
        return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


class _JsonFloat(float):
    """A float decoded from JSON that remembers its text: exact matching compares text (300.0 is not 3.0e2)."""

    __slots__ = ("text",)

    text: str

    def __new__(cls, text: str) -> _JsonFloat:
        self = super().__new__(cls, text)
        self.text = text
        return self

    def __repr__(self) -> str:
        return self.text


def _reject_constant(name: str) -> NoReturn:
    # Python's json accepts NaN and Infinity; JSON does not, and they would compare as nothing.
    raise ValueError(f"{name} is not valid JSON")


def _loads(data: bytes | str) -> Any:
    return json.loads(data, parse_float=_JsonFloat, parse_constant=_reject_constant)


def _number_text(value: int | float) -> str:
    """A number's JSON text: the source text when decoded by `_loads`, else what `json.dumps` would write."""
    if type(value) is _JsonFloat:
        return value.text
    if isinstance(value, float):
        return float.__repr__(value)
    return int.__repr__(value)


def _is_number(value: object) -> bool:
    # bool is an int subclass, but true is not the number 1 in JSON.
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Leaf:
    """A list of alternatives for one key; matches if any alternative does."""

    __slots__ = ("checks", "false", "if_missing", "if_present", "null", "numbers", "strings", "true")

    def __init__(self) -> None:
        # Filled in while compiling, read-only after.
        self.strings: set[str] = set()
        #: Numbers by their JSON text.
        self.numbers: set[str] = set()
        self.true = False
        self.false = False
        self.null = False
        #: `{"exists": false}`: a missing key matches.
        self.if_missing = False
        #: `{"exists": true}`: any value, null included, matches.
        self.if_present = False
        #: Operators other than exists.
        self.checks: list[_Check] = []

    def match(self, value: object) -> bool:
        if value is _MISSING:
            return self.if_missing
        if self.if_present:
            return True
        if isinstance(value, list):
            for item in value:
                if self._match_value(item):
                    return True
            return False
        return self._match_value(value)

    def _match_value(self, value: object) -> bool:
        if isinstance(value, str):
            if value in self.strings:
                return True
        elif value is None:
            if self.null:
                return True
        elif value is True:
            if self.true:
                return True
        elif value is False:
            if self.false:
                return True
        elif isinstance(value, int | float):
            if self.numbers and _number_text(value) in self.numbers:
                return True
        for check in self.checks:
            if check(value):
                return True
        return False


class _Object:
    """Keys that must all match; a missing object counts as an object with none of its keys."""

    __slots__ = ("fields", "if_missing")

    def __init__(self, fields: Sequence[tuple[str, _Object | _Leaf]]) -> None:
        self.fields: tuple[tuple[str, _Object | _Leaf], ...] = tuple(fields)
        self.if_missing: bool = all(child.if_missing for _, child in self.fields)

    def match(self, value: object) -> bool:
        if value is _MISSING:
            return self.if_missing
        if isinstance(value, dict):
            return self.match_fields(value)
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict) and self.match_fields(item):
                    return True
        # A scalar, such as a body that is plain text rather than JSON, has no keys to match.
        return False

    def match_fields(self, document: Mapping[str, Any]) -> bool:
        for key, child in self.fields:
            if not child.match(document.get(key, _MISSING)):
                return False
        return True


def _prefix(prefix: str) -> _Check:
    def check(value: object) -> bool:
        return isinstance(value, str) and value.startswith(prefix)

    return check


def _suffix(suffix: str) -> _Check:
    def check(value: object) -> bool:
        return isinstance(value, str) and value.endswith(suffix)

    return check


def _anything_but_affix(kind: str, affixes: tuple[str, ...]) -> _Check:
    """`{"anything-but": {"prefix" | "suffix": ...}}`: a string that starts (ends) with none of `affixes`."""

    def check(value: object) -> bool:
        if not isinstance(value, str):
            return False  # EventBridge: only strings are compared with a prefix or suffix
        return not (value.startswith(affixes) if kind == "prefix" else value.endswith(affixes))

    return check


def _anything_but(strings: frozenset[str], numbers: frozenset[str]) -> _Check:
    def check(value: object) -> bool:
        if isinstance(value, str):
            return value not in strings
        if value is None or isinstance(value, bool):
            return True
        if isinstance(value, int | float):
            return _number_text(value) not in numbers
        return False  # An object is not a value to compare.

    return check


def _numeric(low: float | None, low_open: bool, high: float | None, high_open: bool) -> _Check:
    def check(value: object) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        # Written as "must hold" tests so that NaN, which compares false to everything, never matches.
        if low is not None and not (value > low if low_open else value >= low):
            return False
        return high is None or (value < high if high_open else value <= high)

    return check


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if _IDENTIFIER.match(key) else f"{path}[{json.dumps(key)}]"


def _describe(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {json.dumps(value)}"
    if _is_number(value):
        return f"the number {value!r}"
    return f"a value of type {type(value).__name__}"


class _Compiler:
    """Compiles one pattern; every error names `where`, the pattern and the JSON path inside it."""

    __slots__ = ("label", "where")

    def __init__(self, where: str, label: str) -> None:
        self.where = where
        self.label = label

    def fail(self, path: str, problem: str, fix: str) -> NoReturn:
        raise ConfigError(self.where, f"{self.label} at {path}: {problem}", fix)

    def parse(self, pattern: object) -> dict[str, Any]:
        if isinstance(pattern, str):
            try:
                pattern = _loads(pattern)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    self.where,
                    f"{self.label} at $: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                    f"write a JSON object such as {_EXAMPLE}",
                ) from exc
            except ValueError as exc:
                raise ConfigError(self.where, f"{self.label} at $: {exc}", "use a finite number, or a string") from exc
        if not isinstance(pattern, Mapping):
            self.fail("$", f"a pattern must be an object, not {_describe(pattern)}", f"write one like {_EXAMPLE}")
        return dict(pattern)

    def compile_object(self, node: Mapping[str, Any], path: str, *, top: bool = False) -> _Object:
        if not node:
            fix = "name at least one key (with no patterns at all, every event passes)" if top else "name a key in it"
            self.fail(path, "an empty object", fix)
        fields: list[tuple[str, _Object | _Leaf]] = []
        for key, value in node.items():
            if not isinstance(key, str):
                self.fail(path, f"key {key!r} is not a string", "quote the key")
            key_path = _child(path, key)
            if isinstance(value, Mapping):
                fields.append((key, self.compile_object(value, key_path)))
            elif isinstance(value, list):
                fields.append((key, self.compile_leaf(value, key_path)))
            else:
                self.fail(
                    key_path,
                    f"{_describe(value)} where a list of alternatives or an object is expected",
                    f"wrap the value in a list: [{_json_or_repr(value)}]",
                )
        return _Object(fields)

    def compile_leaf(self, alternatives: list[Any], path: str) -> _Leaf:
        if not alternatives:
            self.fail(path, "an empty list matches nothing", 'list at least one value, or use [{"exists": true}]')
        leaf = _Leaf()
        for i, alternative in enumerate(alternatives):
            self.add_alternative(leaf, alternative, f"{path}[{i}]")
        return leaf

    def add_alternative(self, leaf: _Leaf, value: Any, path: str) -> None:
        if value is None:
            leaf.null = True
        elif value is True:
            leaf.true = True
        elif value is False:
            leaf.false = True
        elif isinstance(value, str):
            leaf.strings.add(value)
        elif _is_number(value):
            leaf.numbers.add(self.number_text(value, path))
        elif isinstance(value, Mapping):
            self.add_operator(leaf, value, path)
        elif isinstance(value, list):
            self.fail(path, "a list inside a list of alternatives", "put all alternatives in one flat list")
        else:
            self.fail(path, f"{_describe(value)} is not a JSON value", "use a string, number, true, false or null")

    def add_operator(self, leaf: _Leaf, operator: Mapping[str, Any], path: str) -> None:
        if len(operator) != 1:
            self.fail(
                path,
                f"an operator object has exactly one key, this one has {len(operator)}",
                'give each operator its own alternative: [{"prefix": "a"}, {"prefix": "b"}]',
            )
        ((name, argument),) = operator.items()
        op_path = _child(path, str(name))
        if name == "prefix":
            if not isinstance(argument, str):
                self.fail(op_path, f"prefix takes a string, not {_describe(argument)}", 'write {"prefix": "us-"}')
            leaf.checks.append(_prefix(argument))
        elif name == "suffix":
            if not isinstance(argument, str):
                self.fail(op_path, f"suffix takes a string, not {_describe(argument)}", 'write {"suffix": ".jpg"}')
            leaf.checks.append(_suffix(argument))
        elif name == "exists":
            if not isinstance(argument, bool):
                self.fail(op_path, f"exists takes true or false, not {_describe(argument)}", 'write {"exists": true}')
            if argument:
                leaf.if_present = True
            else:
                leaf.if_missing = True
        elif name == "anything-but":
            leaf.checks.append(self.anything_but(argument, op_path))
        elif name == "numeric":
            leaf.checks.append(self.numeric(argument, op_path))
        else:
            close = difflib.get_close_matches(str(name), _OPERATORS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(_OPERATORS)
            self.fail(path, f"unknown operator {name!r}", f"{hint}Lambda's operators are {known}")

    def anything_but(self, argument: Any, path: str) -> _Check:
        if isinstance(argument, Mapping):
            return self.anything_but_affix(argument, path)
        values = argument if isinstance(argument, list) else [argument]
        if not values:
            self.fail(path, "an empty list excludes nothing", 'list the values to exclude: {"anything-but": ["a"]}')
        strings: set[str] = set()
        numbers: set[str] = set()
        for i, value in enumerate(values):
            value_path = f"{path}[{i}]" if isinstance(argument, list) else path
            if isinstance(value, str):
                strings.add(value)
            elif _is_number(value):
                numbers.add(self.number_text(value, value_path))
            else:
                self.fail(
                    value_path,
                    f"anything-but takes strings or numbers, not {_describe(value)}",
                    'write {"anything-but": ["a", "b"]} or {"anything-but": [1, 2]}',
                )
        return _anything_but(frozenset(strings), frozenset(numbers))

    def anything_but_affix(self, argument: Mapping[str, Any], path: str) -> _Check:
        fix = 'write {"anything-but": {"prefix": "tmp/"}} or {"anything-but": {"suffix": [".tmp", ".part"]}}'
        if len(argument) != 1 or next(iter(argument)) not in ("prefix", "suffix"):
            self.fail(path, "anything-but takes a value, a list, or an object with one key: prefix or suffix", fix)
        ((kind, affixes),) = argument.items()
        kind_path = _child(path, kind)
        listed = affixes if isinstance(affixes, list) else [affixes]
        if not listed:
            self.fail(kind_path, "an empty list excludes nothing", fix)
        for i, affix in enumerate(listed):
            if not isinstance(affix, str) or not affix:
                where = f"{kind_path}[{i}]" if isinstance(affixes, list) else kind_path
                self.fail(where, f"anything-but {kind} takes non-empty strings, not {_describe(affix)}", fix)
        return _anything_but_affix(kind, tuple(listed))

    def numeric(self, argument: Any, path: str) -> _Check:
        fix = 'write {"numeric": [">", 0]} or {"numeric": [">=", 0, "<", 100]}'
        if not isinstance(argument, list) or len(argument) not in (2, 4):
            self.fail(path, "numeric takes one or two (operator, number) pairs", fix)
        pairs: list[tuple[str, float]] = []
        for i in range(0, len(argument), 2):
            op, bound = argument[i], argument[i + 1]
            if op not in _COMPARISONS:
                self.fail(f"{path}[{i}]", f"{_describe(op)} is not a comparison; use one of {_COMPARISONS}", fix)
            if not _is_number(bound):
                self.fail(f"{path}[{i + 1}]", f"numeric compares with a number, not {_describe(bound)}", fix)
            self.number_text(bound, f"{path}[{i + 1}]")
            pairs.append((op, bound))
        if len(pairs) == 1:
            ((op, bound),) = pairs
            if op == "=":
                return _numeric(bound, False, bound, False)
            if op in _LOWER:
                return _numeric(bound, op == ">", None, False)
            return _numeric(None, False, bound, op == "<")
        (op1, bound1), (op2, bound2) = pairs
        if op2 in _LOWER and op1 in _UPPER:
            (op1, bound1), (op2, bound2) = (op2, bound2), (op1, bound1)
        if op1 not in _LOWER or op2 not in _UPPER:
            problem = f"a range needs a lower bound (> or >=) and an upper bound (< or <=), not {op1} and {op2}"
            self.fail(path, problem, fix)
        if bound1 > bound2 or (bound1 == bound2 and (op1, op2) != (">=", "<=")):
            self.fail(path, f"the range {op1} {bound1} and {op2} {bound2} is empty", "swap or widen the bounds")
        return _numeric(bound1, op1 == ">", bound2, op2 == "<")

    def number_text(self, value: int | float, path: str) -> str:
        if not math.isfinite(value):
            self.fail(path, f"{value!r} is not a JSON number", "use a finite number")
        return _number_text(value)


def _json_or_repr(value: object) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
