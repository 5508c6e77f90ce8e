"""The service side of handler isolation: how workers start, and how they and what they start are stopped.

- **Environment**: a worker gets the basics (`base_environment`), the service variables named in
  `[workers] env_passthrough`, Lambda's variables and the function's own `environment`; nothing else of the
  service's environment. Only the start-up variables are on its command's environment; the rest arrives in
  the preamble on stdin (`eventfn.sandbox`), so /proc/<pid>/environ never shows a function's variables.
- **User**: a service running as root starts workers as `[workers] user` (default `nobody`), after a probe at
  start-up shows that user can run the interpreter and read the handlers; otherwise they stay root, without
  capabilities, and the log says why and what to change.
- **Process trees**: each worker gets a cgroup of its own where a cgroup v2 hierarchy is writable;
  `cgroup.kill` then stops the worker and everything it started, detached or not, even after the worker died.
  A keeper process does the same for all of them if the service is SIGKILLed (`eventfn.invoke.cgroups`). Without
  cgroups, the worker's descendants are found through /proc (and, with a user namespace, every process in
  it, which nothing the handler starts can leave), stopped with SIGSTOP while the tree is read, then killed.

- **Cold starts**: workers are forked by a fork server (`eventfn.invoke.forks`, `eventfn.invoke.zygote`) that runs
  as the worker user with the start-up variables every worker shares, has imported the runtime, and never holds a
  function's environment: each child reads its own once it is in its cgroup, as any worker does.

`isolated(config)` sets this up for `eventfn serve`; pools created outside it (tests, embedding) get `current()`'s
default: the worker confines itself, without a user switch, user namespace, cgroup or fork server.
"""

from __future__ import annotations

import logging
import os
import pwd
import signal
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec

from eventfn import sandbox
from eventfn.config import ServiceConfig
from eventfn.errors import ConfigError
from eventfn.invoke.cgroups import Cgroups, CgroupsUnavailable, keeper, kill_cgroup
from eventfn.invoke.forks import ForkServer

log = logging.getLogger(__name__)

#: Service variables every worker gets: what processes and the interpreter need to start and behave the same
#: as the service's (`PYTHONPATH` to find eventfn, `PYTHONDONTWRITEBYTECODE`, ...).
BASIC_NAMES = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH")
BASIC_PREFIXES = ("LC_", "PYTHON")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
PROBE_TIMEOUT = 30.0


def base_environment(
    environ: Mapping[str, str], passthrough: Iterable[str] = (), home: str | None = None
) -> dict[str, str]:
    """The part of every worker's environment that comes from the service: the basics and the passthrough."""
    # glibc reserves 64 MB of address space per thread arena; the worker's memory limit caps address
    # space, so a threaded handler would run out early without a small arena count.
    env = {"MALLOC_ARENA_MAX": "2", "PATH": _DEFAULT_PATH}
    env.update({k: v for k, v in environ.items() if k in BASIC_NAMES or k.startswith(BASIC_PREFIXES)})
    if home is not None:
        env["HOME"] = home
    for name in passthrough:
        if name.endswith("*"):
            env.update({k: v for k, v in environ.items() if k.startswith(name[:-1])})
        elif name in environ:
            env[name] = environ[name]
    return env


@dataclass
class Isolation:
    """What the service applies to every worker it starts (see the module docstring)."""

    #: `base_environment` for this service: `Service._environment` builds on it.
    environment: dict[str, str] = field(default_factory=lambda: base_environment(os.environ))
    #: Run workers as this uid, gid and supplementary groups (the user's own); None: as the service.
    uid: int | None = None
    gid: int | None = None
    groups: list[int] = field(default_factory=list)
    user_namespace: bool = False
    cgroups: Cgroups | None = None
    #: Where workers are forked from (None: each worker is a new interpreter).
    forks: ForkServer | None = None

    def fork_server(self) -> ForkServer:
        """A fork server for workers under this isolation (not started yet)."""
        return ForkServer(
            environment=self.command_environment(self.environment),
            credentials=self.credentials(),
            user_namespace=self.user_namespace,
        )

    def command_environment(self, env: Mapping[str, str]) -> dict[str, str]:
        """The part of a worker's environment that must be there when its process starts."""
        return {k: v for k, v in env.items() if sandbox.is_start_up_variable(k)}

    def preamble(self, env: Mapping[str, str], spec: bytes = b"") -> bytes:
        """What the worker reads before anything else: its whole environment, how to confine itself, and (`spec`,
        for a worker forked ahead of its cold start) which function it is."""
        preamble = sandbox.Preamble(environ=dict(env), user_namespace=self.user_namespace, spec=spec)
        return sandbox.encode_preamble(preamble)

    def credentials(self) -> dict[str, Any]:
        """`open_process` arguments that start a worker as the worker user."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": self.groups}

    async def track(self, pid: int) -> ProcessTree:
        """Start tracking a new worker: into a cgroup of its own, if there are cgroups (before it runs any
        handler code, so that nothing it starts is outside)."""
        tree = ProcessTree(self, pid)
        if self.cgroups is not None:
            try:
                tree.cgroup = await self.cgroups.add(pid)
            except OSError as exc:
                log.warning("worker %d runs without a cgroup of its own: %s", pid, exc)
        return tree


@dataclass
class ProcessTree:
    """One worker and every process it starts, and how to kill them all."""

    isolation: Isolation
    pid: int
    cgroup: Path | None = None
    #: Without a cgroup: an open descriptor of the worker's user namespace. It identifies what the worker
    #: started, and holding it open keeps the namespace, so its inode number cannot pass to a new one.
    namespace: int | None = None

    def hold_namespace(self) -> None:
        """Once the worker has entered its user namespace: hold it (only needed without a cgroup)."""
        if self.cgroup is not None or not self.isolation.user_namespace or self.namespace is not None:
            return
        try:
            fd = os.open(f"/proc/{self.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        if os.fstat(fd).st_ino == os.stat("/proc/self/ns/user").st_ino:
            os.close(fd)  # never the service's own: `kill_tree` kills every process in the one it is given
            return
        self.namespace = fd

    async def kill(self, *, reaped: bool) -> None:
        """SIGKILL the worker (unless already `reaped`: its pid may be another process's) and all it started."""
        if self.cgroup is not None:
            try:
                kill_cgroup(self.cgroup)
                return
            except OSError as exc:
                log.warning("cannot kill cgroup %s (%s); killing its processes one by one", self.cgroup, exc)
        namespace = os.fstat(self.namespace).st_ino if self.namespace is not None else None
        # Reading every /proc entry takes milliseconds per hundred processes: not on the event loop.
        await anyio.to_thread.run_sync(kill_tree, None if reaped else self.pid, namespace)

    def release(self) -> None:
        """After the worker was reaped: remove its cgroup, let go of its namespace."""
        if self.cgroup is not None and self.isolation.cgroups is not None:
            self.isolation.cgroups.remove(self.cgroup)
        if self.namespace is not None:
            os.close(self.namespace)
            self.namespace = None


_current = Isolation()


def current() -> Isolation:
    """The isolation `Worker.spawn` applies: the service's inside `isolated()`, else the default."""
    return _current


# -- process trees without cgroups ------------------------------------------------------------------------


def _process_table(namespace: int | None) -> tuple[dict[int, list[int]], set[int]]:
    """Children by parent pid for every process, and the pids in user namespace `namespace`."""
    children: dict[int, list[int]] = {}
    members: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as file:
                stat = file.read()
            # The command name may hold spaces and parentheses: the fields that follow it start after the last `)`.
            ppid = int(stat[stat.rindex(b")") + 2 :].split(maxsplit=2)[1])
            if namespace is not None and os.stat(f"/proc/{name}/ns/user").st_ino == namespace:
                members.add(int(name))
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile, or not ours to look at
        children.setdefault(ppid, []).append(int(name))
    return children, members


def kill_tree(root: int | None, namespace: int | None = None, *, rounds: int = 16) -> set[int]:
    """SIGKILL `root`, its descendants, and (given its user namespace's inode) every process in that namespace.

    `root` None: only the namespace (the worker itself is gone). Each process found is stopped at once, so it
    cannot fork while the rest of the tree is read; the table is re-read until it holds nothing new (at most
    `rounds` times). Returns the pids killed besides `root`.
    """
    if namespace is not None and namespace == os.stat("/proc/self/ns/user").st_ino:
        namespace = None  # ours: that would be every process around
    if root is not None:
        _signal(root, signal.SIGSTOP)
    stopped: set[int] = set()
    for _ in range(rounds):
        children, found = _process_table(namespace)
        stack = [root] if root is not None else []
        while stack:
            for child in children.get(stack.pop(), ()):
                if child not in found:
                    found.add(child)
                    stack.append(child)
        new = found - stopped - {root, os.getpid()}
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    if root is not None:
        _signal(root, signal.SIGKILL)
        try:
            os.killpg(root, signal.SIGKILL)  # its process group too (the worker leads one)
        except OSError:
            pass
    return stopped


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:
        pass  # gone already


# -- start-up --------------------------------------------------------------------------------------------


async def _probe(
    handlers: str, env: Mapping[str, str], *, user_namespace: bool, user: pwd.struct_passwd | None = None
) -> sandbox.Probe | str:
    """Run `eventfn.sandbox probe` as the worker user; the probe's findings, or why it could not run."""
    command = [sys.executable, "-P", "-m", "eventfn.sandbox", "probe", handlers]
    if user_namespace:
        command.append("--user-namespace")
    credentials: dict[str, Any] = {}
    if user is not None:
        groups = os.getgrouplist(user.pw_name, user.pw_gid)
        credentials = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": groups}
    try:
        with anyio.fail_after(PROBE_TIMEOUT):
            done = await anyio.run_process(
                command,
                check=False,
                env={k: v for k, v in env.items() if sandbox.is_start_up_variable(k)},
                cwd="/",
                **credentials,
            )
    except TimeoutError:
        return f"the probe did not finish within {PROBE_TIMEOUT:.0f} s"
    except OSError as exc:
        return f"cannot run {os.path.realpath(sys.executable)}: {exc.strerror}"
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        return f"{sys.executable} -m eventfn.sandbox failed: {lines[-1] if lines else f'exit {done.returncode}'}"
    try:
        return msgspec.json.decode(done.stdout, type=sandbox.Probe)
    except msgspec.DecodeError:
        return f"unexpected probe output: {done.stdout[:200]!r}"


def _lookup(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            "[workers] user", f"no user {user!r} on this system", "create it (e.g. `useradd --system eventfn-worker`)"
        ) from None


async def detect(config: ServiceConfig) -> tuple[Isolation, list[str]]:
    """Work out what isolation this platform allows for `config`; returns it and what to log about it."""
    settings = config.workers
    handlers = os.path.abspath(config.handlers)
    notes: list[str] = []
    euid = os.geteuid()
    found: sandbox.Probe | str | None = None
    worker_user: pwd.struct_passwd | None = None
    if sandbox.LINUX and euid == 0 and (settings.user or "nobody") not in ("root", "0"):
        name = settings.user or "nobody"
        candidate = _lookup(name)
        if candidate.pw_uid != 0:
            env = base_environment(os.environ, settings.env_passthrough, home=candidate.pw_dir)
            found = await _probe(handlers, env, user_namespace=settings.user_namespace, user=candidate)
            if isinstance(found, sandbox.Probe) and found.unreadable:
                found = f"it cannot read {found.unreadable.removesuffix(': permission denied')}"
            if isinstance(found, str):
                notes.append(
                    f"workers run as root, not as {name}: {found}. Without capabilities, but they can still read "
                    f"and write every file root owns. To fix: install Python where {name} can run it (not under "
                    f"/root), make {handlers} readable to {name}, or choose another user with [workers] user; "
                    'set [workers] user = "root" to run workers as root on purpose'
                )
                found = None
            else:
                worker_user = candidate
    elif settings.user is not None and euid != 0 and settings.user not in (str(euid), _name_of(euid)):
        notes.append(f"[workers] user = {settings.user!r} needs the service to run as root; workers run as uid {euid}")
    home = worker_user.pw_dir if worker_user else os.environ.get("HOME")
    environment = base_environment(os.environ, settings.env_passthrough, home=home)
    if found is None and sandbox.LINUX and settings.user_namespace:
        found = await _probe(handlers, environment, user_namespace=True)
    userns = False
    if settings.user_namespace and sandbox.LINUX:
        if isinstance(found, sandbox.Probe) and found.user_namespace is None:
            userns = True
        else:
            reason = found if isinstance(found, str) else found.user_namespace if found else "not probed"
            notes.append(f"workers share one user namespace: {reason}")
    cgroups: Cgroups | None = None
    if settings.cgroup and sandbox.LINUX:
        try:
            cgroups = Cgroups.create()
        except CgroupsUnavailable as exc:
            outlives = "a SIGKILLed service" if userns else "a worker that crashes, or a SIGKILLed service"
            notes.append(
                f"workers have no cgroups of their own ({exc}; under systemd, set Delegate=yes): "
                f"a process a handler starts detached can outlive {outlives}"
            )
    isolation = Isolation(
        environment=environment,
        uid=worker_user.pw_uid if worker_user else None,
        gid=worker_user.pw_gid if worker_user else None,
        groups=os.getgrouplist(worker_user.pw_name, worker_user.pw_gid) if worker_user else [],
        user_namespace=userns,
        cgroups=cgroups,
    )
    return isolation, notes


def _name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)  # a container's arbitrary uid may have no passwd entry


def describe(isolation: Isolation) -> str:
    """One line for the log: how workers run."""
    if isolation.uid is not None:
        user = f"{_name_of(isolation.uid)} (uid {isolation.uid})"
    else:
        user = f"uid {os.geteuid()}, like the service"
    parts = [f"workers run as {user}", "without capabilities", "not dumpable"]
    if isolation.user_namespace:
        parts.append("each in its own user namespace")
    if isolation.cgroups is not None:
        parts.append(f"each in its own cgroup under {isolation.cgroups.base}")
    return ", ".join(parts)


@asynccontextmanager
async def isolated(config: ServiceConfig) -> AsyncIterator[Isolation]:
    """Detect and apply worker isolation for the service's lifetime (`current()` returns it meanwhile)."""
    global _current
    isolation, notes = await detect(config)
    for note in notes:
        log.warning("%s", note)
    if sandbox.LINUX and isolation.uid is None and os.geteuid() != 0 and not isolation.user_namespace:
        # Workers share the service's uid and a user namespace: only this keeps them out of its
        # /proc/<pid>/environ (which holds its NATS credentials) and memory.
        sandbox.set_dumpable(False)
        log.info("the service made itself non-dumpable, so that workers cannot read its environment or memory")
    if not sandbox.LINUX:
        log.warning("worker isolation beyond separate processes and a clean environment needs Linux")
    else:
        log.info("%s", describe(isolation))
    previous, _current = _current, isolation
    async with AsyncExitStack() as stack:
        if isolation.cgroups is not None:
            await stack.enter_async_context(keeper(isolation.cgroups.base))
        if sandbox.LINUX:
            isolation.forks = isolation.fork_server()
            await isolation.forks.start()  # now, not at the first cold start; logs why if it cannot
        try:
            yield isolation
        finally:
            _current = previous
            if isolation.forks is not None:
                with anyio.CancelScope(shield=True):
                    await isolation.forks.aclose()
            if isolation.cgroups is not None:
                with anyio.CancelScope(shield=True):
                    await isolation.cgroups.close()  # then the keeper, finding nothing left, ends
