"""What a worker does to itself before any handler code runs (the worker side of handler isolation).

`eventfn.invoke.runtime` calls `confine()` first thing. It reads the preamble the service writes on stdin before any
frame (once the service released it): the function's environment, delivered there rather than on the command line
or in the initial environment block (both visible in /proc to processes of the same user from the moment the
process starts), and what to apply. Then, in this order:

1. a user namespace of its own (identity-mapped, so files and uids look the same): processes in another user
   namespace, such as other functions' workers and anything they start, cannot read this worker's /proc
   entries (environ, mem, fds) even under the same uid, and nested user namespaces are refused, so every
   process the handler starts stays recognisable as its own;
2. die with its parent (PR_SET_PDEATHSIG), the service or the fork server (`eventfn.invoke.zygote`), which dies
   with the service: no worker outlives a SIGKILLed `eventfn serve`;
3. not dumpable: /proc/<pid>/environ and mem then need CAP_SYS_PTRACE, which no worker has;
4. no capabilities and no way to gain any (no_new_privs, empty bounding set): a worker running as root cannot
   read other processes' memory or environment, override file permissions, or regain privileges through a
   setuid binary.

Also `python -m eventfn.sandbox probe DIR`: what the service runs once at start-up, as the worker user, to learn
what the platform allows before it relies on it.

Stdlib and msgspec only, like the rest of the worker's start-up path; ctypes is imported only on Linux.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
from collections.abc import Callable
from typing import Any

import msgspec

_HEADER = struct.Struct(">I")
#: The preamble carries an environment: generous, but bounded like any frame.
_MAX_PREAMBLE = 4 * 1024 * 1024

#: Variables a process reads as it starts (the dynamic loader, glibc's malloc and locale, the interpreter):
#: these go into the worker's initial environment; every other variable arrives with the preamble.
_START_UP_NAMES = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "HOME", "TMPDIR"})
_START_UP_PREFIXES = ("LC_", "LD_", "PYTHON", "MALLOC_", "GLIBC_")

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CLONE_NEWUSER = 0x10000000
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

LINUX = sys.platform.startswith("linux")


class Preamble(msgspec.Struct, frozen=True, kw_only=True):
    """What the service sends a worker before anything else: its environment and its confinement."""

    environ: dict[str, str]
    user_namespace: bool = False
    #: The worker's `WorkerSpec` as JSON when its command did not carry it: a worker forked by the zygote ahead of
    #: the cold start it serves learns which function it is only now.
    spec: bytes = b""


def is_start_up_variable(name: str) -> bool:
    """True for a variable the worker needs in its initial environment (read before `confine` runs)."""
    return name in _START_UP_NAMES or name.startswith(_START_UP_PREFIXES)


def encode_preamble(preamble: Preamble) -> bytes:
    """The preamble as the service writes it: a 4-byte length, then msgpack."""
    body = msgspec.msgpack.encode(preamble)
    return _HEADER.pack(len(body)) + body


def _read_exactly(fd: int, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_preamble(fd: int = 0) -> Preamble | None:
    """Read the preamble from `fd` without reading past it; None if the service closed the pipe first."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > _MAX_PREAMBLE:
        raise SystemExit(f"eventfn worker: preamble of {size} bytes exceeds the limit")
    body = _read_exactly(fd, size)
    if body is None:
        return None
    return msgspec.msgpack.decode(body, type=Preamble)


def confine(fd: int = 0, *, in_user_namespace: bool = False) -> Preamble:
    """Read the preamble, confine this process (see the module docstring), install the environment; the preamble.

    `in_user_namespace`: it entered its own already (a worker forked by the zygote, `enter_own_user_namespace`).
    Exits quietly if the service is gone before the preamble arrived.
    """
    preamble = read_preamble(fd)
    if preamble is None:
        raise SystemExit(0)
    if LINUX:
        c = libc()
        if preamble.user_namespace and not in_user_namespace:
            enter_user_namespace(c)
        # After the user namespace: a non-dumpable process cannot write its own uid_map.
        _prctl(c, _PR_SET_PDEATHSIG, signal.SIGKILL)
        _prctl(c, _PR_SET_DUMPABLE, 0)
        drop_privileges(c)
    # Only now, with /proc closed to others: the initial environment held the start-up variables only.
    os.environ.update(preamble.environ)
    return preamble


def libc() -> Any:
    """The C library through ctypes (Linux; the zygote loads it before it forks)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies; exits at once if `parent` is no longer its parent (it died
    before the setting took effect). Used by the zygote and the workers it forks, which hold nothing yet."""
    if LINUX:
        _prctl(libc(), _PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def enter_own_user_namespace() -> None:
    """For a worker forked by the zygote, before release: a user namespace of its own (`enter_user_namespace`).

    A forked process inherits the zygote's non-dumpability, and a non-dumpable process's /proc/self/uid_map
    belongs to root, so it cannot map itself: it is dumpable for the mapping only, while it holds no secret yet
    (its environment arrives after release), and not dumpable again before it goes on.
    """
    c = libc()
    _prctl(c, _PR_SET_DUMPABLE, 1)
    try:
        enter_user_namespace(c)
    finally:
        _prctl(c, _PR_SET_DUMPABLE, 0)


def _prctl(libc: Any, option: int, arg: int = 0, *, check: bool = True) -> bool:
    import ctypes

    zero = ctypes.c_ulong(0)
    if libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), zero, zero, zero) == 0:
        return True
    if check:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")
    return False


def parent_death_signal(signum: int) -> Callable[[], None] | None:
    """A function that has the kernel send `signum` to the process calling it when that process's parent dies
    (None off Linux). libc is loaded now, so that calling it in a child after a fork (a `preexec_fn`) only
    makes the system call."""
    if not LINUX:
        return None
    c = libc()

    def arm() -> None:
        _prctl(c, _PR_SET_PDEATHSIG, signum)

    return arm


def set_dumpable(dumpable: bool) -> None:
    """PR_SET_DUMPABLE for this process: not dumpable, its /proc entries need CAP_SYS_PTRACE to read."""
    if LINUX:
        _prctl(libc(), _PR_SET_DUMPABLE, int(dumpable))


def enter_user_namespace(libc: Any) -> None:
    """Move into a new user namespace where this process keeps its uid and gid (an identity mapping)."""
    import ctypes

    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(ctypes.c_int(_CLONE_NEWUSER)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare(CLONE_NEWUSER): {os.strerror(errno)}")
    # From here the process has no uid until the maps are written: a failure leaves it unable to create files.
    try:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    except OSError as exc:
        raise SystemExit(f"eventfn worker: cannot map uid {uid} in its user namespace: {exc}") from exc
    # No nested user namespaces: processes the handler starts stay in this one, where the service finds them.
    _write("/proc/sys/user/max_user_namespaces", "0")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def drop_privileges(libc: Any) -> None:
    """No capabilities now, none through exec (empty bounding and ambient sets), no gain through setuid."""
    import ctypes

    _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)
    try:
        with open("/proc/sys/kernel/cap_last_cap") as file:
            last = int(file.read())
    except OSError:
        last = 63
    for cap in range(last + 1):
        # EPERM without CAP_SETPCAP (a worker that is not root): its bounding set does not matter then,
        # since exec grants a non-root process no capabilities and no_new_privs stops setuid and file caps.
        if not _prctl(libc, _PR_CAPBSET_DROP, cap, check=False):
            break
    _prctl(libc, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, check=False)  # EINVAL before Linux 4.3

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    empty = (Data * 2)()
    if libc.capset(ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), empty) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"capset: {os.strerror(errno)}")


class Probe(msgspec.Struct, frozen=True, kw_only=True):
    """What `probe` found, as the user workers will run as. Each field is None when fine, else the reason."""

    unreadable: str | None = None
    user_namespace: str | None = None


def probe(handlers: str, user_namespace: bool) -> Probe:
    """Check, as this process's user, that the handler directory is readable and a user namespace works."""
    unreadable = _first_unreadable(handlers)
    userns: str | None = "not Linux" if not LINUX else None
    if LINUX and user_namespace:
        try:
            enter_user_namespace(libc())
        except (OSError, SystemExit) as exc:
            userns = str(exc)
    return Probe(unreadable=unreadable, user_namespace=userns)


def _first_unreadable(root: str, limit: int = 5000) -> str | None:
    """The first file or folder under `root` this process cannot read (up to `limit` entries), or None."""
    seen = 0
    for path, dirs, files in os.walk(root, onerror=lambda exc: None):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in [path, *(os.path.join(path, f) for f in files)]:
            seen += 1
            if seen > limit:
                return None
            mode = os.R_OK | (os.X_OK if name == path else 0)
            if not os.access(name, mode):
                return f"{name}: permission denied"
    if not os.access(root, os.R_OK | os.X_OK):
        return f"{root}: permission denied"
    return None


def main(argv: list[str]) -> int:
    """`python -m eventfn.sandbox probe DIR [--user-namespace]`: print a `Probe` as JSON."""
    if len(argv) < 2 or argv[0] != "probe":
        print("usage: python -m eventfn.sandbox probe DIR [--user-namespace]", file=sys.stderr)
        return 2
    result = probe(argv[1], "--user-namespace" in argv[2:])
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
