"""A handler's return value as JSON, exactly where Lambda's Python runtime can encode it and nowhere else.

Lambda's runtime (awslambdaric `lambda_runtime_marshaller`) encodes with simplejson's defaults plus Decimal:
tuples and namedtuples (as objects) are encoded, dict keys that are int, float, bool or None become strings,
NaN and infinities are written as `NaN` / `Infinity` (as Python's own json module does), UTF-8 `bytes` become
strings, a `bytes` result is the response body itself, and Decimal is a number written as `str()` gives it.
Anything else (datetime, set, UUID, an Enum that is not an int or str, an arbitrary object) is
`Runtime.MarshalError`. Imported by every worker before user code: msgspec only, no extra imports.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec


def _unsupported(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_encoder = msgspec.json.Encoder(enc_hook=_unsupported)
_NAN = msgspec.Raw(b"NaN")
_INFINITY = msgspec.Raw(b"Infinity")
_MINUS_INFINITY = msgspec.Raw(b"-Infinity")


def encode(result: Any) -> bytes:
    """The response body for `result`; raises (TypeError, ValueError...) where Lambda's runtime reports
    `Runtime.MarshalError`, with its message."""
    if isinstance(result, bytes):
        return bytes(result)  # Lambda returns a bytes result as the body, unencoded
    try:
        plain = _plain(result)
    except RecursionError:  # a reference cycle or very deep nesting: the full walk says which
        plain = False
    if plain:
        try:
            return _encoder.encode(result)
        except UnicodeEncodeError:  # a lone surrogate in a string: escaped below, as simplejson does
            pass
    return _encoder.encode(_convert(result, set()))


def _plain(obj: Any) -> bool:
    """Whether `obj` holds only what msgspec and Lambda encode alike (the common case: checked, not copied)."""
    kind = type(obj)
    if kind is dict:
        for key in obj:
            if type(key) is not str:
                return False
        values: Any = obj.values()
    elif kind is list:
        values = obj
    elif kind is float:
        return bool(obj - obj == 0.0)  # false for NaN and the infinities
    else:
        return kind is str or kind is int or kind is bool or obj is None
    for value in values:
        kind = type(value)
        if kind is str or kind is int or kind is bool or value is None:
            continue
        if kind is float:
            if value - value != 0.0:  # NaN and the infinities
                return False
        elif not _plain(value):
            return False
    return True


def _convert(obj: Any, active: set[int]) -> Any:
    """`obj` rebuilt from what msgspec encodes as Lambda's encoder would write it, in simplejson's order of
    checks. `active` holds the containers being walked, to report a cycle as simplejson does."""
    if isinstance(obj, str):
        return _string(obj)
    if isinstance(obj, bytes):
        return _string(obj.decode("utf-8"))
    if obj is None or obj is True or obj is False:
        return obj
    if isinstance(obj, int):
        return int.__index__(obj)  # an IntEnum is its value
    if isinstance(obj, float):
        return _float(obj)
    if isinstance(obj, list):
        return _sequence(obj, active)
    as_dict = getattr(obj, "_asdict", None)  # a namedtuple (or anything else with `_asdict`) is an object
    if as_dict is not None and callable(as_dict):
        value = as_dict()
        if not isinstance(value, dict):
            raise TypeError(f"_asdict() must return a dict, not {type(value).__name__}")
        return _mapping(value, active)
    if isinstance(obj, tuple):
        return _sequence(obj, active)
    if isinstance(obj, dict):
        return _mapping(obj, active)
    if isinstance(obj, Decimal):
        return _NAN if obj.is_nan() else msgspec.Raw(str(obj).encode())
    return _unsupported(obj)


def _enter(obj: Any, active: set[int]) -> int:
    marker = id(obj)
    if marker in active:
        raise ValueError("Circular reference detected")
    active.add(marker)
    return marker


def _sequence(obj: list[Any] | tuple[Any, ...], active: set[int]) -> list[Any]:
    marker = _enter(obj, active)
    out = [_convert(value, active) for value in obj]
    active.discard(marker)
    return out


def _mapping(obj: dict[Any, Any], active: set[int]) -> dict[str, Any]:
    marker = _enter(obj, active)
    out = {_key(key): _convert(value, active) for key, value in obj.items()}
    active.discard(marker)
    return out


def _key(key: Any) -> str:
    if isinstance(key, str):
        return str.__str__(key)  # a str Enum is its value, as simplejson writes it
    if isinstance(key, bytes):
        return key.decode("utf-8")
    if isinstance(key, float):
        value = _float(key)
        return bytes(value).decode() if isinstance(value, msgspec.Raw) else repr(value)
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return str(int.__index__(key))
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _float(value: float) -> float | msgspec.Raw:
    if value != value:
        return _NAN
    if value in (float("inf"), float("-inf")):
        return _INFINITY if value > 0 else _MINUS_INFINITY
    return float.__float__(value)


def _string(value: str) -> str | msgspec.Raw:
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:  # lone surrogates: JSON escapes, as simplejson writes them
            import json  # rare: not worth an import on every cold start

            return msgspec.Raw(json.dumps(value).encode())
    return str.__str__(value)
