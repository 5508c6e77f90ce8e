"""The fork server ("zygote"): a worker interpreter with the runtime already imported, which forks a worker per cold
start.

Run as `python -B -P -m eventfn.invoke.zygote CONTROL_FD SERVICE_PID [--user-namespace]`, one per service, with the
workers' credentials and the start-up variables every worker shares (`eventfn.invoke.forks` starts it). It imports
what a worker imports (and asyncio, half of an async handler's cold start), freezes those objects out of the
garbage collector's reach (so that forked children do not copy the pages their headers live on), and then forks a
child per request. It never sees a function's environment: a child reads its own from the service, over its
channel, once released, exactly as a worker started as a new interpreter does (`eventfn.invoke.runtime.main`), so
nothing of one function can pass to another through the fork.

A child, before release: a session (and process group) of its own, SIGKILL when the zygote dies, the channel on
fds 0 and 1, and (with `--user-namespace`) a user namespace of its own, entered while it holds no secret.

The control socket is a Unix SOCK_SEQPACKET pair: one message per request and per record.

- service -> zygote: `fork`, with the child's two channel descriptors (read, write) attached (SCM_RIGHTS). Which
  function the child serves, it learns from the service with its environment once released: a child can be forked
  (and put in its cgroup) ahead of the cold start it serves.
- zygote -> service: `RECORD` messages: `R 0 0` once ready; `F pid errno` per request, in order (pid 0 and an errno
  if fork failed); `X pid status` when a child exited (its exit status, negative: killed by that signal).

Stdlib, msgspec and the worker runtime only (`tests/test_zygote.py` checks the imports).
"""

from __future__ import annotations

import errno
import gc
import os
import select
import signal
import socket
import struct
import sys
import traceback

RECORD = struct.Struct(">cii")
MAX_REQUEST = 64


def main(argv: list[str]) -> int:
    """Entry point of the zygote process."""
    control_fd, service_pid = int(argv[0]), int(argv[1])
    user_namespace = "--user-namespace" in argv[2:]
    from eventfn import sandbox

    # First, before the imports: die with the service, and keep other processes of this uid out of this one
    # (its children would run whatever code they put here). It keeps its capabilities, if any (workers that run
    # as root): a child maps uid 0 into its user namespace only with CAP_SETFCAP, then drops them all itself.
    sandbox.die_with_parent(service_pid)
    sandbox.set_dumpable(False)
    _preload()
    control = socket.socket(fileno=control_fd)
    gc.freeze()  # everything imported so far stays out of the collector's reach, its pages shared with the children
    control.send(RECORD.pack(b"R", 0, 0))
    serve(control, user_namespace)
    return 0


def _preload() -> None:
    """Import what every worker imports, before the first fork."""
    import asyncio  # noqa: F401 - an async handler's event loop: half of its cold start otherwise
    import json  # noqa: F401
    import logging  # noqa: F401

    import eventfn.invoke.runtime  # noqa: F401
    from eventfn import sandbox

    sandbox.libc()  # ctypes and the C library, as `confine` uses them


def serve(control: socket.socket, user_namespace: bool) -> None:
    """Fork a child per request and report children's exits, until the service closes the control socket."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a handler, so that the wakeup descriptor hears it
    poller = select.poll()
    poller.register(control, select.POLLIN)
    poller.register(wake_read, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_read:
                _drain(wake_read)
                _reap(control)
                continue
            data, fds, _, _ = socket.recv_fds(control, MAX_REQUEST, 2)
            if not data:
                return  # the service is gone (or let go of this zygote): its children die with this process
            if len(fds) != 2:
                for received in fds:
                    os.close(received)
                control.send(RECORD.pack(b"F", 0, errno.EBADF))
                continue
            try:
                pid = os.fork()
            except OSError as exc:
                control.send(RECORD.pack(b"F", 0, exc.errno or errno.EAGAIN))
            else:
                if pid == 0:
                    _child(control, (wake_read, wake_write), fds, user_namespace)
                control.send(RECORD.pack(b"F", pid, 0))
            finally:
                for received in fds:
                    os.close(received)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        control.send(RECORD.pack(b"X", pid, os.waitstatus_to_exitcode(status)))


def _child(control: socket.socket, wakeup: tuple[int, int], fds: list[int], user_namespace: bool) -> None:
    """The forked child: becomes a worker (`eventfn.invoke.runtime.start`) and never returns to the zygote's loop."""
    code = 1
    try:
        zygote = os.getppid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in wakeup:
            os.close(fd)
        control.close()
        os.setsid()  # a session and process group of its own, as a worker started by the service has
        from eventfn import sandbox
        from eventfn.invoke import runtime

        sandbox.die_with_parent(zygote)
        reader, writer = fds
        os.dup2(reader, 0)
        os.dup2(writer, 1)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        fds.clear()
        if user_namespace:
            sandbox.enter_own_user_namespace()
        # Waits for release (which function, and its environment, from the service), confines itself, loads the
        # handler, serves.
        runtime.start(None, in_user_namespace=user_namespace)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # the process ends either way
                pass
        os._exit(code)


def _exit_code(exc: SystemExit) -> int:
    """The status the interpreter would exit with for `exc`, printing its message as it would."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
