"""Bounded decoding of data eventfn does not control: event bodies, headers, handler replies, stored records.

Every decode of such data goes through here, so that one rule holds everywhere: whatever the bytes, the caller
gets a value or `UnreadableData` (whose message says what was wrong), never another exception. One place is
needed because the libraries disagree on how they fail: msgspec raises `DecodeError` for invalid JSON but
`RecursionError` for nesting deeper than the interpreter's recursion limit (about 1,000 levels, fewer when the
caller's stack is already deep), Python's `json` raises `RecursionError` too and `ValueError` for an integer
of more than 4,300 digits, bytes that are not UTF-8 raise `UnicodeDecodeError`, and `base64` raises
`binascii.Error`.

Depth is bounded by the recursion limit, caught as an error, rather than measured: a valid event costs what
the parser costs, and only a failure pays for building the message. Size is bounded by the NATS message
limit upstream; what this module returns for display is cut to a stated length.
"""

from __future__ import annotations

import base64
import re
import sys
from typing import Any, TypeVar

import msgspec

from eventfn.errors import UnreadableData

T = TypeVar("T")

#: What a decoder of untrusted data may raise. `msgspec.DecodeError`, `json.JSONDecodeError`,
#: `UnicodeDecodeError` and `binascii.Error` are all `ValueError`s.
ERRORS = (ValueError, RecursionError)


def problem(exc: BaseException) -> str:
    """What was wrong with the data, in words, for an exception in `ERRORS`."""
    if isinstance(exc, RecursionError):
        return f"nested too deeply to parse (the limit is about {sys.getrecursionlimit()} levels)"
    if isinstance(exc, msgspec.ValidationError):
        return f"not the expected shape: {exc}"
    if isinstance(exc, msgspec.DecodeError):
        return f"not valid JSON: {exc}"
    if isinstance(exc, UnicodeError):
        return f"not UTF-8 text: {exc}"
    return str(exc) or type(exc).__name__


def unreadable(exc: BaseException) -> UnreadableData:
    """`UnreadableData` describing `exc` (raise it `from exc`)."""
    return UnreadableData(problem(exc))


def json_value(data: bytes | str) -> Any:
    """`data` decoded as JSON; raises `UnreadableData` for anything that is not JSON eventfn can parse."""
    try:
        return msgspec.json.decode(data)
    except ERRORS as exc:
        raise unreadable(exc) from exc


def typed(decoder: msgspec.json.Decoder[T], data: bytes | str) -> T:
    """`data` decoded by `decoder` (a typed msgspec decoder); raises `UnreadableData` on any failure."""
    try:
        return decoder.decode(data)
    except ERRORS as exc:
        raise unreadable(exc) from exc


def base64_bytes(text: str) -> bytes:
    """Strict standard base64 (no stray characters); raises `UnreadableData`."""
    try:
        return base64.b64decode(text, validate=True)
    except ERRORS as exc:  # also a str that is not ASCII
        raise UnreadableData(f"not valid base64: {exc}") from exc


def base64_json_object(raw: str) -> bytes:
    """The JSON of an object sent as base64 text (Lambda's client context), checked; raises `UnreadableData` for
    text that is not base64, JSON that does not parse, or a value that is not an object (Lambda refuses those)."""
    data = base64_bytes(raw)
    value: Any = json_value(data)
    if not isinstance(value, dict):
        kind = "an array" if isinstance(value, list) else "a string" if isinstance(value, str) else "a scalar"
        raise UnreadableData(f"it is {kind}, not an object")
    return data


def text(data: bytes, limit: int | None = None) -> str:
    """Bytes as text for a person to read: invalid UTF-8 replaced, cut to `limit` characters."""
    return data[: None if limit is None else limit * 4].decode("utf-8", "replace")[:limit]


def encodable(value: object) -> str:
    """`str(value)` with what UTF-8 cannot encode (a lone surrogate from a JSON escape) replaced by `?`."""
    return str(value).encode("utf-8", "replace").decode("utf-8")


def one_line(value: str, limit: int = 1024) -> str:
    """`value` cut to `limit` characters, as one line safe for a terminal: control characters (line breaks,
    escape sequences) become spaces."""
    value = value[:limit]
    return value if value.isprintable() else "".join(c if c.isprintable() else " " for c in value)


#: What a terminal would act on rather than show: C0 and C1 controls (escape sequences start with one), line and
#: paragraph separators, and the invisible or direction-changing format characters.
_TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")


def printable(value: str) -> str:
    """`value` safe to print to a terminal: control characters other than line breaks and tabs are escaped."""
    return _TERMINAL_CONTROLS.sub(lambda m: ascii(m.group())[1:-1], value)


def pretty(data: bytes) -> str:
    """JSON indented for reading, else the bytes as text; either way safe to print to a terminal."""
    try:
        return printable(msgspec.json.format(data, indent=2).decode())
    except ERRORS:
        return printable(text(data))
