"""The filesystem side of the bucket watcher: which files are objects, and reading them safely and completely.

- A key is a path inside a bucket folder, its parts joined by `/`. Symbolic links are never followed, anywhere
  under the bucket: a key with a link among its parts is not an object, and files are opened one directory at a
  time (`openat` with `O_NOFOLLOW`), so a link swapped in between two checks is refused too.
- Temporary and partial files (`Ignore`) are not objects, nor is anything inside a folder whose name is ignored.
- A file is complete when no process has it open for writing. Linux tells that through a read lease, which the
  kernel refuses (EAGAIN) while any writer has the file open; where leases are unavailable (a file of another
  user without CAP_LEASE, a filesystem without them) the caller waits for a quiet period instead (`UNSURE`).

Everything here blocks: the watcher calls it through `anyio.to_thread`, except `lstat_key`, a few `lstat`s.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import hashlib
import os
import re
import signal
import stat
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import unquote_plus

#: S3's longest key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024
_CHUNK = 1 << 20
#: Where the kernel reports a lease break: a signal ignored by default, so that a writer opening the file in the
#: microseconds a probe holds its lease cannot kill the service (the default, SIGIO, terminates).
_LEASE_SIGNAL = signal.SIGURG
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO (never an object, but it could sit in a bucket) must not wait for a writer.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class Stat(NamedTuple):
    """What tells one version of a file from another without reading it (as rsync's quick check)."""

    size: int
    mtime_ns: int
    ino: int
    #: Changes with every write, rename and link: the sequencer grows with it.
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stat:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    def same_version(self, other: Stat) -> bool:
        """The same content, as far as the file's metadata tells (ctime alone changes with chmod, too)."""
        return self.size == other.size and self.mtime_ns == other.mtime_ns and self.ino == other.ino


class Ignore:
    """Which names are not objects: hidden ones (if `hidden`) and those matching any of `globs`."""

    def __init__(self, globs: Iterable[str], *, hidden: bool) -> None:
        self.globs = tuple(globs)
        self.hidden = hidden
        pattern = "|".join(f"(?:{fnmatch.translate(g)})" for g in self.globs)
        self._match = re.compile(pattern).match if pattern else None

    def name(self, name: str) -> bool:
        """Whether a file or folder called `name` is ignored (with everything inside it)."""
        if self.hidden and name.startswith("."):
            return True
        return self._match is not None and self._match(name) is not None

    def key(self, key: str) -> bool:
        """Whether any part of `key` is ignored."""
        return any(self.name(part) for part in key.split("/"))


def key_problem(key: str) -> str | None:
    """Why `key` (a path inside a bucket) cannot be an S3 object key, or None."""
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "its name is not valid UTF-8 (S3 keys are UTF-8)"
    if size > MAX_KEY_BYTES:
        return f"its key is {size} bytes long, over S3's {MAX_KEY_BYTES}"
    return None


def key_parts(key: str) -> list[str] | None:
    """The folder and file names `key` is made of, or None if one is empty, `.`, `..` or holds a NUL: such a key
    would not name a file inside its bucket."""
    parts = key.split("/")
    if any(part in ("", ".", "..") or "\0" in part for part in parts):
        return None
    return parts


def lstat_key(bucket_dir: Path, key: str, ignore: Ignore) -> Stat | None:
    """The object's `Stat`, or None if `key` is not an object now: missing, not a regular file, ignored, or
    reached through a symbolic link. Raises OSError for anything else (permission denied: try again later)."""
    parts = key_parts(key)
    if parts is None or ignore.key(key):
        return None
    path = os.fspath(bucket_dir)  # strings: this runs for every change reported
    try:
        for part in parts[:-1]:
            path = f"{path}/{part}"
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return None
        st = os.lstat(f"{path}/{parts[-1]}")
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Stat.of(st) if stat.S_ISREG(st.st_mode) else None


class Scan(NamedTuple):
    """A bucket's objects as found on disk."""

    objects: dict[str, Stat]
    #: The folders listed, as key prefixes ("" for the bucket itself, else ending in `/`): what the watcher watches.
    folders: list[str]
    #: Folders (key prefixes ending in `/`, or "" for the bucket) that could not be listed: what the index holds
    #: under them is neither confirmed nor removed.
    unreadable: list[str]
    #: Files that cannot be objects, and why.
    refused: dict[str, str]


def scan(directory: Path, ignore: Ignore, prefix: str = "") -> Scan:
    """Every object under `directory` (keys start with `prefix`), without following any symbolic link."""
    objects: dict[str, Stat] = {}
    folders: list[str] = []
    unreadable: list[str] = []
    refused: dict[str, str] = {}
    stack = [(directory, prefix)]
    while stack:
        folder, base = stack.pop()
        try:
            if stat.S_ISLNK(os.lstat(folder).st_mode):
                continue  # swapped for a link since it was listed
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        except OSError:
            unreadable.append(base)
            continue
        folders.append(base)
        for entry in entries:
            if ignore.name(entry.name):
                continue
            try:
                if entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), f"{base}{entry.name}/"))
                elif entry.is_file(follow_symlinks=False):
                    key = base + entry.name
                    if (problem := key_problem(key)) is not None:
                        refused[key] = problem
                    else:
                        objects[key] = Stat.of(entry.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue  # removed while listing: the watcher reports it
            except OSError:
                unreadable.append(f"{base}{entry.name}")
    return Scan(objects, folders, unreadable, refused)


def open_file(bucket_dir: Path, parts: list[str]) -> int:
    """A read-only descriptor of the file at `parts`, opened one folder at a time without following links."""
    fd = os.open(bucket_dir, DIRECTORY_FLAGS)
    try:
        for part in parts[:-1]:
            child = os.open(part, DIRECTORY_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        return os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)


Writers = Literal["none", "open", "unknown"]


def writers(fd: int) -> Writers:
    """Whether a process has the file open for writing: "none", "open", or "unknown" (no lease available).

    Takes a read lease and gives it back at once: the kernel refuses one with EAGAIN while the file is open for
    writing anywhere."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, _LEASE_SIGNAL)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return "open" if exc.errno == errno.EAGAIN else "unknown"
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return "none"


def md5_of(fd: int, stop: threading.Event | None = None, size: int | None = None) -> str:
    """The MD5 of the file's content (its first `size` bytes, if given), hex: S3's ETag of an object put in one part.

    Raises InterruptedError once `stop` is set: reading a huge file (a sparse one reads terabytes of zeros
    quickly, but not at once) must not hold up the service's stop."""
    digest = hashlib.md5(usedforsecurity=False)
    offset = 0
    end = size if size is not None else -1
    while chunk := os.pread(fd, _CHUNK if end < 0 else min(_CHUNK, end - offset), offset):
        if stop is not None and stop.is_set():
            raise InterruptedError("reading the object was given up")
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


class Inspection(NamedTuple):
    """What reading an object found: its status, its `Stat` and (when complete) its ETag."""

    #: "complete": read whole, with no writer and no change while reading; "writing": a process has it open for
    #: writing; "unsure": no lease available, complete only after a quiet period; "changed": it changed while
    #: being read; "gone": not an object (any more).
    status: Literal["complete", "writing", "unsure", "changed", "gone"]
    stat: Stat | None = None
    etag: str | None = None


def inspect(
    bucket_dir: Path, key: str, *, etag: str | None = None, quiet: bool = False, stop: threading.Event | None = None
) -> Inspection:
    """Read the object at `key` if its write is complete: its ETag (unless `etag` is already known, for a file
    moved or linked from another key), checked against a change while it was read.

    `quiet`: the caller saw the file unchanged for the settle time, so it counts as complete even if the kernel
    cannot tell whether a writer has it open. `stop`: see `md5_of`."""
    parts = key_parts(key)
    if parts is None:
        return Inspection("gone")
    try:
        fd = open_file(bucket_dir, parts)
    except OSError as exc:
        # ELOOP: a link where a folder or the file was; ENOTDIR: a file where a folder was.
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
            return Inspection("gone")
        raise
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return Inspection("gone")
        found = Stat.of(before)
        state = writers(fd)
        if state == "open":
            return Inspection("writing", found)
        if state == "unknown" and not quiet:
            return Inspection("unsure", found)
        digest = etag if etag is not None else md5_of(fd, stop)
        if Stat.of(os.fstat(fd)) != found:
            return Inspection("changed", found)
    finally:
        os.close(fd)
    # The name may have moved on to another file while this one was read.
    try:
        now = os.lstat(f"{os.fspath(bucket_dir)}/{key}")
    except FileNotFoundError:
        return Inspection("gone")
    if Stat.of(now) != found:
        return Inspection("changed", found)
    return Inspection("complete", found, digest)


# -- for handlers -------------------------------------------------------------------------------------------------

#: The environment variable that holds the buckets root (absolute) in a bucket-triggered function's workers.
ROOT_VARIABLE = "EVENTFN_BUCKETS_ROOT"


def object_path(record: Mapping[str, Any], root: str | os.PathLike[str] | None = None) -> Path:
    """The file of the object an S3 record (one of `event["Records"]`) names: `<root>/<bucket>/<key>`, the key
    URL-decoded.

    `root` defaults to `$EVENTFN_BUCKETS_ROOT`. Raises ValueError for a record whose bucket or key would lead
    outside the root (a `..` part, an absolute key, a symbolic link on the way). The file itself may be gone by
    the time the handler runs (or, for an `ObjectRemoved` event, is).
    """
    from eventfn_connectors.bucket.options import bucket_problem

    if root is None:
        if not (root := os.environ.get(ROOT_VARIABLE)):
            raise ValueError(f"{ROOT_VARIABLE} is not set: pass root=, or run the handler with a bucket trigger")
    s3 = record["s3"]
    bucket = s3["bucket"]["name"]
    if not isinstance(bucket, str) or bucket_problem(bucket) is not None:
        raise ValueError(f"{bucket!r} is not a bucket name")
    key = unquote_plus(s3["object"]["key"])
    parts = key_parts(key)
    if parts is None:
        raise ValueError(f"key {key!r} has an empty, '.' or '..' part: it would not name a file in the bucket")
    path = Path(root, bucket)
    for part in parts:
        path = path / part
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise ValueError(f"{path} is a symbolic link: eventfn never follows links out of a bucket")
        except FileNotFoundError:
            break
    return Path(root, bucket, *parts)
