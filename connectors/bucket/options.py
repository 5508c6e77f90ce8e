"""What a user declares: a bucket trigger's options (`[[triggers]] type = "bucket"`) and the watcher's settings
(`[buckets]` in `eventfn.toml`), checked when they are read; and what a trigger becomes: the subjects and filters
of its mapping.
"""

from __future__ import annotations

import json
import re
from typing import Annotated

import msgspec

from eventfn.config import TriggerOptions
from eventfn_connectors.bucket.records import encode_key

#: The event names a trigger may list (S3's, for the object events it can announce), by class.
EVENT_NAMES = {
    "ObjectCreated": ("Put", "Post", "Copy", "CompleteMultipartUpload"),
    "ObjectRemoved": ("Delete", "DeleteMarkerCreated"),
}
ALLOWED_EVENTS = tuple(
    f"s3:{cls}:{name}" for cls, names in EVENT_NAMES.items() for name in ("*", *names)
)  # fmt: skip
#: What is announced: a file written or moved in, or a PutObject (Put), an object moved or hard-linked to a new key,
#: or a CopyObject (Copy), a multipart upload completed through the S3 API (CompleteMultipartUpload), a file or
#: an object removed (Delete). The other names are accepted, as S3 accepts them, and never fire.
PRODUCED = ("ObjectCreated:Put", "ObjectCreated:Copy", "ObjectCreated:CompleteMultipartUpload", "ObjectRemoved:Delete")

#: Temporary and partial files, never objects: `fnmatch` globs matched against each part of a path.
DEFAULT_IGNORE = (
    "*.tmp",
    "*.part",
    "*.swp",
    "*.swx",
    "*~",
    ".#*",
    "#*#",
    "4913",  # vim's probe of whether it may write a directory
    "*.crdownload",
)

#: S3's bucket naming rules, without dots: a bucket name is one NATS subject token.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]\Z")


def bucket_problem(name: str) -> str | None:
    """Why `name` cannot be a bucket (a phrase), or None if it can."""
    if _BUCKET.match(name):
        return None
    if "." in name:
        return "it contains '.': eventfn's bucket names are S3's without dots, because a name is one NATS token"
    if not 3 <= len(name) <= 63:
        return f"it is {len(name)} characters long; S3 bucket names have 3 to 63"
    if not name[0].isalnum() or not name[-1].isalnum():
        return "it must start and end with a lower-case letter or a digit"
    bad = sorted({c for c in name if not (c.isascii() and (c.islower() or c.isdigit() or c == "-"))})
    return f"it contains {', '.join(map(repr, bad))}; bucket names have lower-case letters, digits and '-'"


class BucketTrigger(TriggerOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A trigger on a bucket: a folder under the buckets root (`[buckets] root`).

    Batches are S3 notifications, `{"Records": [...]}` (a list at batch size 1 too).
    """

    type: str = "bucket"
    #: The bucket: a folder directly under the buckets root (created if missing).
    bucket: str
    #: S3's event names and wildcards: `s3:ObjectCreated:*`, `s3:ObjectCreated:Put`, `s3:ObjectRemoved:*`, ...
    events: list[str] = msgspec.field(default_factory=lambda: ["s3:ObjectCreated:*"])
    #: Only objects whose key starts with this (S3's `prefix` filter rule, on the key as it is: `my folder/`).
    prefix: str = ""
    #: Only objects whose key ends with this (S3's `suffix` filter rule: `.jpg`).
    suffix: str = ""

    def __post_init__(self) -> None:
        if (problem := bucket_problem(self.bucket)) is not None:
            raise ValueError(f"bucket {self.bucket!r} is not a valid bucket name: {problem}")
        if not self.events:
            raise ValueError(f"events is empty; list at least one of: {', '.join(ALLOWED_EVENTS)}")
        for name in self.events:
            if name not in ALLOWED_EVENTS:
                hint = " (S3's event names start with 's3:')" if f"s3:{name}" in ALLOWED_EVENTS else ""
                raise ValueError(f"unknown event {name!r}{hint}; events are: {', '.join(ALLOWED_EVENTS)}")
        if self.prefix.startswith("/"):
            raise ValueError(
                f"prefix {self.prefix!r} starts with '/', which no key does (keys are paths in the bucket)"
            )
        for label, value in (("prefix", self.prefix), ("suffix", self.suffix)):
            if "\0" in value or len(value.encode("utf-8", "surrogatepass")) > 1024:
                raise ValueError(f"{label} is not a possible part of a key (S3 keys are at most 1024 bytes, no NUL)")

    def describe(self) -> list[str]:
        rules = "".join(
            f" {label} {value!r}" for label, value in (("prefix", self.prefix), ("suffix", self.suffix)) if value
        )
        return [f"bucket {self.bucket}: {', '.join(self.events)}{rules}"]

    def _rules(self) -> list[tuple[str, str]]:
        return [(label, value) for label, value in (("prefix", self.prefix), ("suffix", self.suffix)) if value]

    def event_patterns(self) -> list[tuple[str, str]]:
        """The (class, name or `*`) pairs the trigger asks for, a name covered by its class's `*` left out."""
        pairs = {tuple(name.split(":")[1:3]) for name in self.events}
        wild = {cls for cls, name in pairs if name == "*"}
        return sorted((cls, name) for cls, name in pairs if name == "*" or cls not in wild)

    def key_filters(self) -> tuple[str, ...]:
        """Lambda filter patterns for `prefix` and `suffix`, on the record's encoded key (every one must match).

        S3 encodes a key byte by byte, so `encode_key(prefix)` is a prefix of `encode_key(key)` exactly when
        `prefix` is a prefix of `key`. For a suffix that holds too, except where the encoded suffix starts with
        an upper-case hex digit: its first characters could then end a `%XX` escape of the byte before it
        (`é.jpg` is `%C3%A9.jpg`, which ends with `9.jpg`). A third pattern rules those cases out.
        """
        patterns: list[str] = []
        if self.prefix:
            patterns.append(_key_pattern({"prefix": encode_key(self.prefix)}))
        if self.suffix:
            encoded = encode_key(self.suffix)
            patterns.append(_key_pattern({"suffix": encoded}))
            excluded = [f"%{h}{encoded}" for h in "0123456789ABCDEF"] if encoded[0] in _HEX else []
            if len(encoded) > 1 and encoded[0] in _HEX and encoded[1] in _HEX:
                excluded.append(f"%{encoded}")
            if excluded:
                patterns.append(_key_pattern({"anything-but": {"suffix": excluded}}))
        return tuple(patterns)


_HEX = frozenset("0123456789ABCDEF")


def _key_pattern(leaf: dict[str, object]) -> str:
    return json.dumps({"body": {"s3": {"object": {"key": [leaf]}}}}, ensure_ascii=False)


Seconds = Annotated[float, msgspec.Meta(ge=0, le=3600)]


class BucketSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The bucket watcher's settings: `[buckets]` in `eventfn.toml`."""

    #: The folder that holds the buckets, one per subdirectory (relative: to the service's working directory).
    root: str = "buckets"
    #: File and folder names that are never objects (`fnmatch` globs against each part of a key): temporary
    #: and partial files. Setting it replaces the default list.
    ignore: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_IGNORE))
    #: Dotfiles and dot-folders are never objects.
    ignore_hidden: bool = True
    #: Where eventfn cannot ask the kernel whether a file is still open for writing (a file of another user, a
    #: filesystem without leases), a file counts as complete once its size and time have not changed for this long.
    settle: Seconds = 2.0
    #: Changes noticed within this many seconds of each other are taken together.
    debounce: Annotated[float, msgspec.Meta(ge=0.005, le=10)] = 0.05
    #: Seconds between full re-scans of the watched buckets (a safety net for changes the kernel did not report:
    #: a full inotify queue, a network filesystem); 0: only at start and when the buckets watched change.
    rescan_interval: Seconds = 300.0
    #: The first time a bucket is watched (nothing indexed yet), announce the objects already in it as
    #: `ObjectCreated:Put`. Default false: they are indexed silently, as S3 sends nothing for objects that were
    #: there before a notification was configured.
    announce_existing: bool = False
