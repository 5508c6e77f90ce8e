"""The S3 API's side of the filesystem: objects read, written, removed and listed inside bucket folders, never
through a symbolic link, and an object's S3 metadata kept with its file.

- **Confinement.** Every path is walked one folder at a time from the bucket's folder (`openat` with
  `O_NOFOLLOW`): a link anywhere on the way is refused, including one swapped in between two checks. Keys with an
  empty, `.` or `..` part, or a NUL, never reach the disk.
- **Atomic writes.** A body is written to a file staged in `<root>/.eventfn-uploads/` (the same filesystem, a
  name no bucket can have), synced, then renamed over the key: readers and the watcher see the old object or the
  new one, never a part.
- **Metadata.** Content-Type, the other stored headers, `x-amz-meta-*` and the ETag live in one extended
  attribute of the object's file (`user.eventfn.s3`), set on the staged file before its rename: it travels with
  the file atomically, goes when the file goes, and needs no second file to keep in step with what users do in
  the folders. It names the size and mtime it describes: a file rewritten in place by something else has stale
  metadata, which is then ignored. Where the filesystem has no user xattrs, objects are stored without it.
- **Listing.** Keys come out in the order of their UTF-8 bytes, as S3 lists them, from a walk that sorts each
  folder by name (a folder's name followed by `/`) and skips what is outside the prefix or before the start.

Everything here blocks: the API calls it through `anyio.to_thread`.
"""

from __future__ import annotations

import bisect
import collections
import errno
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import msgspec

from eventfn_connectors.bucket.files import DIRECTORY_FLAGS, Ignore, Stat, key_problem, md5_of
from eventfn_connectors.bucket.options import bucket_problem
from eventfn_connectors.bucket.s3xml import S3Error, invalid_argument, no_such_bucket

log = logging.getLogger("eventfn.connector.bucket")

#: The folder under the buckets root where bodies are staged and multipart uploads kept: hidden, and not a valid
#: bucket name, so the watcher never looks there and ListBuckets never shows it.
STAGING = ".eventfn-uploads"
META_XATTR = "user.eventfn.s3"
#: Longest name of one folder or file (Linux's NAME_MAX).
MAX_NAME_BYTES = 255
_CHUNK = 1 << 20
#: When this process started (as near as importing this module): a staged file of its id from before is a crash's.
_STARTED = time.time()
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class Meta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What S3 keeps of an object besides its bytes: its ETag, headers and user metadata."""

    etag: str
    #: The file's size and mtime this describes: anything else has rewritten the file since.
    size: int
    mtime_ns: int
    #: Content-Type, Content-Encoding, Content-Disposition, Content-Language, Cache-Control, Expires (lower-case).
    headers: dict[str, str] = {}
    #: `x-amz-meta-*`, without the prefix.
    user: dict[str, str] = {}

    def describes(self, st: os.stat_result) -> bool:
        return self.size == st.st_size and self.mtime_ns == st.st_mtime_ns


_meta_encoder = msgspec.json.Encoder()
_meta_decoder = msgspec.json.Decoder(Meta)
#: Whether the filesystem took the last xattr written (False after ENOTSUP: warned once, then silent).
_xattrs = {"ok": True}


def read_meta(fd: int, st: os.stat_result) -> Meta | None:
    """The object's metadata, if it has some that still describes its file."""
    try:
        meta = _meta_decoder.decode(os.getxattr(fd, META_XATTR))
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    return meta if meta.describes(st) else None


def write_meta(fd: int, meta: Meta) -> None:
    """Attach `meta` to the open file (where the filesystem can)."""
    try:
        os.setxattr(fd, META_XATTR, _meta_encoder.encode(meta))
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.E2BIG, errno.ENOSPC, errno.EPERM):
            raise
        if _xattrs["ok"]:
            _xattrs["ok"] = False
            log.warning(
                "S3 API: the buckets' filesystem does not keep user extended attributes (%s): objects are stored "
                "without their Content-Type and x-amz-meta-* headers, and a multipart object's ETag is its MD5",
                os.strerror(exc.errno or 0),
            )


class EtagCache:
    """MD5s already computed of files without metadata, by (device, inode, size, mtime): a second GET or HEAD of a
    large file a user dropped into a bucket does not read it again."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._found: collections.OrderedDict[tuple[int, int, int, int], str] = collections.OrderedDict()
        self._lock = threading.Lock()  # used from the API's threads

    @staticmethod
    def _key(st: os.stat_result) -> tuple[int, int, int, int]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def get(self, st: os.stat_result) -> str | None:
        key = self._key(st)
        with self._lock:
            found = self._found.get(key)
            if found is not None:
                self._found.move_to_end(key)
        return found

    def put(self, st: os.stat_result, etag: str) -> None:
        with self._lock:
            self._found[self._key(st)] = etag
            if len(self._found) > self._size:
                self._found.popitem(last=False)


# -- keys and folders ---------------------------------------------------------------------------------------------


def write_problem(key: str, ignore: Ignore) -> str | None:
    """Why an object cannot be stored under `key` (a sentence that says what to do), or None."""
    if (problem := key_problem(key)) is not None:
        return f"key {key!r}: {problem}"
    parts = key.split("/")
    if key.endswith("/"):
        return (
            f"key {key!r} ends in '/': objects are files in the bucket's folder, and a folder exists only through "
            "the objects in it (put 'folder/name', not 'folder/')"
        )
    if any(part in ("", ".", "..") or "\0" in part for part in parts):
        return (
            f"key {key!r} has an empty, '.' or '..' part, or a NUL: it would not name a file inside the bucket "
            "(keys are paths below the bucket's folder)"
        )
    if (long := next((p for p in parts if len(p.encode("utf-8")) > MAX_NAME_BYTES), None)) is not None:
        return f"key {key!r}: the part {long[:40]!r}... is over {MAX_NAME_BYTES} bytes, longer than a file name can be"
    if ignore.key(key):
        return (
            f"key {key!r} is a name the bucket watcher ignores (a hidden or temporary file: [buckets] ignore and "
            "ignore_hidden): it would never be an object nor make an event; choose another name"
        )
    return None


def _open_bucket(root: Path, bucket: str) -> int:
    if bucket_problem(bucket) is not None:  # `..`, `.`, the staging folder: never a bucket, whoever asks
        raise no_such_bucket(bucket)
    try:
        return os.open(root / bucket, DIRECTORY_FLAGS)
    except FileNotFoundError:
        raise no_such_bucket(bucket) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise no_such_bucket(bucket) from None
        raise


def _open_folders(root: Path, bucket: str, folders: list[str], *, create: bool) -> list[int]:
    """Descriptors of the bucket's folder and of each of `folders` below it, opened one at a time without
    following links (made if missing and `create`); the caller closes them. Raises FileNotFoundError for a missing
    folder when not `create`."""
    fds = [_open_bucket(root, bucket)]
    try:
        for i, part in enumerate(folders):
            try:
                fds.append(os.open(part, DIRECTORY_FLAGS, dir_fd=fds[-1]))
                continue
            except FileNotFoundError:
                if not create:
                    raise
            except OSError as exc:
                if exc.errno == errno.ENAMETOOLONG and not create:
                    raise FileNotFoundError(exc.errno, exc.strerror) from None  # no such folder can exist
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    where = "/".join(folders[: i + 1])
                    raise invalid_argument(
                        f"{where!r} in bucket {bucket!r} is a file or a symbolic link, not a folder: a key cannot "
                        "go below it (folders and files share names on disk, and links are never followed)"
                    ) from None
                raise
            try:
                os.mkdir(part, dir_fd=fds[-1])
            except FileExistsError:
                pass  # made meanwhile by another request: open it below
            fds.append(os.open(part, DIRECTORY_FLAGS, dir_fd=fds[-1]))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


class Opened(NamedTuple):
    """An object's file, open for reading, with what it is."""

    fd: int
    stat: os.stat_result
    meta: Meta | None


def open_object(root: Path, bucket: str, parts: list[str], ignore: Ignore) -> Opened | None:
    """The object at `parts` open for reading, or None if there is none: missing, a folder, a link, ignored. Raises
    NoSuchBucket."""
    if ignore.key("/".join(parts)):
        return None
    try:
        fds = _open_folders(root, bucket, parts[:-1], create=False)
    except (FileNotFoundError, S3Error) as exc:
        if isinstance(exc, S3Error) and exc.code == "NoSuchBucket":
            raise
        return None
    try:
        fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fds[-1])
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EISDIR, errno.ENAMETOOLONG):
            return None
        raise
    finally:
        for dir_fd in fds:
            os.close(dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return Opened(fd, st, read_meta(fd, st))


def etag_of(opened: Opened, cache: EtagCache, known: str | None = None) -> str:
    """The object's ETag: from its metadata, from what the watcher recorded (`known`), or its MD5 (read once)."""
    if opened.meta is not None:
        return opened.meta.etag
    if known is not None:
        return known
    if (cached := cache.get(opened.stat)) is not None:
        return cached
    # The bytes served are the first st_size: a file another process is still appending to gets the ETag of those.
    etag = md5_of(opened.fd, size=opened.stat.st_size)
    if Stat.of(os.fstat(opened.fd)) == Stat.of(opened.stat):
        cache.put(opened.stat, etag)
    return etag


def read_range(fd: int, start: int, length: int) -> Iterator[bytes]:
    """`length` bytes from `start`, a chunk at a time (fewer if the file shrank meanwhile)."""
    end = start + length
    while start < end:
        chunk = os.pread(fd, min(_CHUNK, end - start), start)
        if not chunk:
            return
        start += len(chunk)
        yield chunk


# -- staging and committing ---------------------------------------------------------------------------------------


def staging_dir(root: Path) -> Path:
    path = root / STAGING
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


class Staged:
    """A file being written in the staging folder; `commit` renames it over a key, `discard` removes it."""

    def __init__(self, root: Path, prefix: str = "put") -> None:
        # The process's id in the name: a body a killed service left half-written is known as such (`clean_staging`).
        self.path = staging_dir(root) / f"{prefix}-{os.getpid()}-{secrets.token_hex(12)}.tmp"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
            self.size += written

    def finish(self, meta: Callable[[os.stat_result], Meta | None]) -> None:
        """Sync the bytes and attach the metadata (`meta` of the file's final stat), ready for `commit`."""
        os.fsync(self.fd)
        st = os.fstat(self.fd)
        if (found := meta(st)) is not None:
            write_meta(self.fd, found)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def commit(
    root: Path, bucket: str, parts: list[str], staged: Path, check: Callable[[os.stat_result | None], None]
) -> Stat:
    """Rename `staged` over the object at `parts` (folders made as needed); returns the new object's `Stat`.
    `check` sees what is there now (None: nothing) and raises to refuse (a failed precondition)."""
    for attempt in range(3):
        fds = _open_folders(root, bucket, parts[:-1], create=True)
        try:
            name, folder = parts[-1], fds[-1]
            try:
                there: os.stat_result | None = os.lstat(name, dir_fd=folder)
            except FileNotFoundError:
                there = None
            if there is not None and stat.S_ISDIR(there.st_mode):
                raise invalid_argument(
                    f"key {'/'.join(parts)!r} names a folder in bucket {bucket!r}: an object cannot replace a folder"
                )
            check(there if there is not None and stat.S_ISREG(there.st_mode) else None)
            try:
                os.rename(staged, name, dst_dir_fd=folder)
            except FileNotFoundError:
                if attempt == 2 or not os.path.exists(staged):
                    raise
                continue  # the folder was removed meanwhile (its last object deleted): make it again
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    raise OSError(
                        exc.errno,
                        f"bucket {bucket!r} is on another filesystem than the buckets root, where eventfn stages "
                        f"uploads ({root / STAGING}); keep buckets on the root's filesystem",
                    ) from None
                raise
            os.fsync(folder)  # the rename itself is durable before the object is announced
            return Stat.of(os.lstat(name, dir_fd=folder))
        finally:
            for fd in fds:
                os.close(fd)
    raise AssertionError("unreachable")


def remove(root: Path, bucket: str, parts: list[str], check: Callable[[os.stat_result | None], None]) -> bool:
    """Remove the object at `parts` and the folders its removal leaves empty; False if there was none (not an
    error: S3's DeleteObject of a missing key succeeds). Folders, links and other non-files are never removed."""
    try:
        fds = _open_folders(root, bucket, parts[:-1], create=False)
    except FileNotFoundError:
        check(None)
        return False
    except S3Error as exc:
        if exc.code == "NoSuchBucket":
            raise
        check(None)
        return False  # a file or link on the way: no object there
    try:
        try:
            there: os.stat_result | None = os.lstat(parts[-1], dir_fd=fds[-1])
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENAMETOOLONG):
                raise
            there = None
        if there is None or not stat.S_ISREG(there.st_mode):
            check(None)
            return False
        check(there)
        os.unlink(parts[-1], dir_fd=fds[-1])
        # S3 has no folders: one holding nothing more goes with its last object (a concurrent write makes it again).
        for depth in range(len(parts) - 1, 0, -1):
            try:
                os.rmdir(parts[depth - 1], dir_fd=fds[depth - 1])
            except OSError:
                break
        return True
    finally:
        for fd in fds:
            os.close(fd)


def buckets(root: Path) -> list[tuple[str, float]]:
    """The buckets (real folders directly under the root with a valid bucket name) and when each was made."""
    found = []
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False) and bucket_problem(entry.name) is None:
                found.append((entry.name, entry.stat(follow_symlinks=False).st_mtime))
        except FileNotFoundError:
            continue
    return sorted(found)


def is_bucket(root: Path, bucket: str) -> bool:
    if bucket_problem(bucket) is not None:
        return False
    try:
        return stat.S_ISDIR(os.lstat(root / bucket).st_mode)
    except OSError:
        return False


# -- listing ------------------------------------------------------------------------------------------------------


class _Folder(NamedTuple):
    #: Each entry's name as it sorts (UTF-8, a folder's followed by `/`), in order.
    sorts: list[bytes]
    names: list[str]
    #: None for a folder; the file's stat otherwise.
    stats: list[os.stat_result | None]


class Found(NamedTuple):
    key: str
    stat: os.stat_result
    #: The ETag from the object's metadata, if it has some.
    etag: str | None


class Page(NamedTuple):
    objects: list[Found]
    prefixes: list[str]
    #: Where the next page starts (keys after these bytes), if there is one.
    next_after: bytes | None


#: Above every key that starts with a given prefix: no UTF-8 byte is 0xFF.
_ABOVE = b"\xff"


class Lister:
    """One listing of one bucket: folders read once each, however often the walk passes them."""

    def __init__(self, root: Path, bucket: str, ignore: Ignore) -> None:
        self.root = root
        self.bucket = bucket
        self.ignore = ignore
        self._folders: dict[str, _Folder] = {}

    def page(self, prefix: str, delimiter: str, after: bytes, max_keys: int) -> Page:
        """Up to `max_keys` objects and common prefixes after `after` (bytes of a key), S3's ListObjects."""
        objects: list[Found] = []
        prefixes: list[str] = []
        if max_keys <= 0:
            return Page(objects, prefixes, None)
        prefix_b = prefix.encode("utf-8")
        while True:
            restart = False
            for key, st in self._walk(prefix_b, after):
                if len(objects) + len(prefixes) == max_keys:
                    return Page(objects, prefixes, after)
                if delimiter:
                    at = key.find(delimiter, len(prefix))
                    if at >= 0:
                        common = key[: at + len(delimiter)]
                        prefixes.append(common)
                        after = common.encode("utf-8") + _ABOVE  # past every key under it
                        restart = True
                        break
                objects.append(Found(key, st, None))
                after = key.encode("utf-8")
            if not restart:
                return Page(objects, prefixes, None)

    def _walk(self, prefix: bytes, after: bytes) -> Iterator[tuple[str, os.stat_result]]:
        try:
            fd = _open_bucket(self.root, self.bucket)
        except S3Error:
            return
        try:
            yield from self._walk_folder(fd, "", b"", prefix, after)
        finally:
            os.close(fd)

    def _walk_folder(
        self, fd: int, base: str, base_b: bytes, prefix: bytes, after: bytes
    ) -> Iterator[tuple[str, os.stat_result]]:
        folder = self._read(fd, base)
        start = 0
        for bound in (after, prefix):
            if bound.startswith(base_b) and bound != base_b:
                tail = bound[len(base_b) :]
                at = bisect.bisect_left(folder.sorts, tail)
                # A folder whose name starts the bound (`a/` for `a/b`) holds keys past it.
                if at > 0 and folder.stats[at - 1] is None and tail.startswith(folder.sorts[at - 1]):
                    at -= 1
                start = max(start, at)
        for i in range(start, len(folder.sorts)):
            full = base_b + folder.sorts[i]
            st = folder.stats[i]
            if not full.startswith(prefix):
                if full > prefix and not prefix.startswith(full):
                    return  # sorted: everything from here on is past the prefix
                if st is not None or not prefix.startswith(full):
                    continue
            if st is not None:
                if full > after:
                    yield base + folder.names[i], st
                continue
            if full <= after and not after.startswith(full):
                continue
            try:
                child = os.open(folder.names[i], DIRECTORY_FLAGS, dir_fd=fd)
            except OSError:
                continue  # removed, or swapped for a link, since it was read
            try:
                yield from self._walk_folder(child, base + folder.names[i] + "/", full, prefix, after)
            finally:
                os.close(child)

    def _read(self, fd: int, base: str) -> _Folder:
        found = self._folders.get(base)
        if found is not None:
            return found
        entries: list[tuple[bytes, str, os.stat_result | None]] = []
        try:
            listed = list(os.scandir(fd))
        except OSError:
            listed = []
        for entry in listed:
            name = entry.name
            if self.ignore.name(name):
                continue
            try:
                if entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    entries.append((name.encode("utf-8", "surrogateescape") + b"/", name, None))
                elif entry.is_file(follow_symlinks=False):
                    if key_problem(base + name) is None:
                        entries.append((name.encode("utf-8"), name, entry.stat(follow_symlinks=False)))
            except OSError:
                continue  # removed while listing
        entries.sort(key=lambda e: e[0])
        found = _Folder([e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries])
        self._folders[base] = found
        return found

    def metadata(self, key: str) -> Meta | None:
        """The metadata of a listed object (for its ETag), if it has some that still describes it."""
        parts = key.split("/")
        try:
            fds = _open_folders(self.root, self.bucket, parts[:-1], create=False)
        except (OSError, S3Error):
            return None
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fds[-1])
        except OSError:
            return None
        finally:
            for dir_fd in fds:
                os.close(dir_fd)
        try:
            return read_meta(fd, os.fstat(fd))
        finally:
            os.close(fd)


def clean_staging(root: Path, older_than: float) -> int:
    """Remove staged bodies left by a crash: those of a process that is gone (this one's before it started, if its
    id came back), and any older than `older_than` seconds; returns how many."""
    removed = 0
    try:
        entries = list(os.scandir(root / STAGING))
    except OSError:
        return 0
    now = time.time()
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue  # a multipart upload's folder: it lives until completed or aborted, as in S3
            mtime = entry.stat(follow_symlinks=False).st_mtime
            if now - mtime > older_than or _abandoned(entry.name, mtime):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


def _abandoned(name: str, mtime: float) -> bool:
    """Whether the staged file `name` (`<prefix>-<pid>-<token>.tmp`) was written by a process that is no more."""
    parts = name.split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return False  # named otherwise (an older version's): only its age tells
    pid = int(parts[1])
    if pid == os.getpid():
        return mtime < _STARTED
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        return False
    return False
