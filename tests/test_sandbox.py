"""Handler isolation against real processes: worker environments, /proc, users, and process trees.

Most tests start `eventfn serve` and let handlers report pids through the probe; the test then looks at /proc
itself. Processes that exit are not announced to anyone but their parent, so waiting for a pid to disappear
is the one place these tests poll (bounded, see `wait_gone` and `await_gone`). Every pid a handler reports is
SIGKILLed at teardown, so a failing test leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client

import eventfn
from eventfn import sandbox
from eventfn.config import environment_overrides, load_service_config
from eventfn.invoke import cgroups, isolation
from eventfn.testing import PROBE_MODULE, NatsServer, Serve, function_info, wait_until, write_handler

linux_only = pytest.mark.skipif(not sandbox.LINUX, reason="process isolation beyond a clean environment is Linux's")


# -- helpers ------------------------------------------------------------------------------------------------


def dead(pid: int) -> bool:
    """Gone, or a zombie (killed; its new parent may be an init that does not reap)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"Z", b"X")


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids still alive after `timeout` (polled: a process's exit is announced to its parent only). Blocks;
    async tests `await await_gone(...)`."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if not dead(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


async def await_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """`wait_gone` with the event loop running meanwhile."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if not dead(p)]) and time.monotonic() < deadline:  # noqa: ASYNC110 - exits go unannounced
        await anyio.sleep(0.05)
    return alive


def children_of(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def zygotes_of(service: int) -> list[int]:
    """The service's fork servers (`python -m eventfn.invoke.zygote`), by their command lines."""
    return [p for p in children_of(service) if b"eventfn.invoke.zygote" in Path(f"/proc/{p}/cmdline").read_bytes()]


@pytest.fixture
def started() -> Iterator[list[int]]:
    """Pids handlers reported; SIGKILLed at teardown, whatever the test found."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def config_file(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "eventfn.toml"
    path.write_text(text)
    return ["--config", str(path)]


async def invoke(nc: Client, name: str, payload: object = None, timeout: float = 20) -> object:
    reply = await nc.request(f"eventfn.invoke.{name}", json.dumps(payload or {}).encode(), timeout=timeout)
    return json.loads(reply.data)


# -- environment --------------------------------------------------------------------------------------------


def test_base_environment_is_the_basics_and_the_passthrough_only() -> None:
    environ = {
        "PATH": "/opt/bin:/usr/bin",
        "LANG": "C.UTF-8",
        "LC_TIME": "sv_SE.UTF-8",
        "TZ": "Europe/Stockholm",
        "HOME": "/root",
        "PYTHONPATH": "/srv/lib",
        "PYTHONDONTWRITEBYTECODE": "1",
        "SECRET_DB_PASSWORD": "hunter2",
        "EVENTFN_NATS_TOKEN": "t0ken",
        "AWS_PROFILE": "prod",
        "OTEL_SERVICE_NAME": "orders",
        "OTEL_EXPORTER": "otlp",
    }
    env = isolation.base_environment(environ, ["AWS_PROFILE", "OTEL_*", "NOT_SET"], home="/nonexistent")
    assert env == {
        "MALLOC_ARENA_MAX": "2",
        "PATH": "/opt/bin:/usr/bin",
        "LANG": "C.UTF-8",
        "LC_TIME": "sv_SE.UTF-8",
        "TZ": "Europe/Stockholm",
        "HOME": "/nonexistent",
        "PYTHONPATH": "/srv/lib",
        "PYTHONDONTWRITEBYTECODE": "1",
        "AWS_PROFILE": "prod",
        "OTEL_SERVICE_NAME": "orders",
        "OTEL_EXPORTER": "otlp",
    }
    assert isolation.base_environment({})["PATH"] == "/usr/local/bin:/usr/bin:/bin"


def test_worker_settings_come_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "eventfn.toml"
    path.write_text('[workers]\nenv_passthrough = ["AWS_PROFILE"]\nuser = "eventfn-worker"\ncgroup = false\n')
    settings = load_service_config(path, {}).workers
    assert (settings.env_passthrough, settings.user, settings.cgroup, settings.user_namespace) == (
        ["AWS_PROFILE"],
        "eventfn-worker",
        False,
        True,
    )
    overrides = environment_overrides(
        {"EVENTFN_WORKER_ENV_PASSTHROUGH": "PROBE_NATS, OTEL_*", "EVENTFN_WORKER_USER": "1001"}
    )
    settings = load_service_config(path, overrides).workers
    assert (settings.env_passthrough, settings.user, settings.cgroup) == (["PROBE_NATS", "OTEL_*"], "1001", False)
    path.write_text("[workers]\nenv_passtrough = []\n")
    with pytest.raises(eventfn.ConfigError, match="env_passtrough"):
        load_service_config(path, {})


def test_start_up_variables_alone_are_on_the_command_line_environment() -> None:
    assert all(map(sandbox.is_start_up_variable, ["PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "LD_LIBRARY_PATH"]))
    assert not any(map(sandbox.is_start_up_variable, ["API_KEY", "AWS_LAMBDA_FUNCTION_NAME", "PROBE_NATS"]))


@pytest.mark.e2e
async def test_a_handler_sees_none_of_the_services_secrets(
    tmp_path: Path, handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    write_handler(
        handlers,
        "peek",
        """
        # /// eventfn
        # [environment]
        # API_KEY = "only-for-peek"
        # ///
        import os

        def read(path):
            try:
                return open(path, "rb").read().decode(errors="replace")
            except OSError as exc:
                return type(exc).__name__

        def handler(event, context):
            return {
                "environ": dict(os.environ),
                "initial": read("/proc/self/environ"),
                "service": read(f"/proc/{event['service']}/environ"),  # not its parent: that is the zygote
                "status": [l for l in read("/proc/self/status").splitlines() if l.startswith(("CapEff", "NoNewPrivs"))],
            }
    """,
    )
    service = await serve(
        env={
            "SECRET_DB_PASSWORD": "hunter2",
            "EVENTFN_NATS_TOKEN": "t0ken",
            "PASSED_ON": "yes",
            "EVENTFN_WORKER_ENV_PASSTHROUGH": "PROBE_NATS,PASSED_*",
        }
    )
    assert service.process is not None
    seen = await invoke(nc, "peek", {"service": service.process.pid})
    assert isinstance(seen, dict)
    environ = seen["environ"]
    assert environ["PASSED_ON"] == "yes" and environ["PROBE_NATS"]
    assert environ["API_KEY"] == "only-for-peek" and environ["AWS_LAMBDA_FUNCTION_NAME"] == "peek"
    assert not [k for k in environ if k.startswith(("SECRET", "EVENTFN"))], environ
    basic = [k for k in os.environ if k in isolation.BASIC_NAMES or k.startswith(isolation.BASIC_PREFIXES)]
    leaked = {k for k, v in os.environ.items() if k not in basic and environ.get(k) == v}
    assert leaked <= {"PROBE_NATS", "PASSED_ON"}, leaked
    # Its own /proc entry shows the start-up variables only: the function's arrive later, by pipe.
    assert "only-for-peek" not in seen["initial"] and "PATH=" in seen["initial"]
    if sandbox.LINUX:
        assert seen["service"] == "PermissionError", "the service's environment holds its NATS credentials"
        assert seen["status"] == ["CapEff:\t0000000000000000", "NoNewPrivs:\t1"]


# -- other functions' environments ------------------------------------------------------------------------


@linux_only
@pytest.mark.e2e
@pytest.mark.parametrize("user_namespace", [True, False], ids=["own-user-namespace", "shared-user-namespace"])
async def test_a_function_cannot_read_another_functions_environment(
    tmp_path: Path,
    handlers: Path,
    serve: Callable[..., Awaitable[Serve]],
    nc: Client,
    probe,
    started: list[int],
    user_namespace: bool,
) -> None:
    write_handler(
        handlers,
        "holder",
        """
        # /// eventfn
        # [environment]
        # HOLDER_SECRET = "holder-only"
        # ///
        import os, subprocess
        import _probe

        def handler(event, context):
            child = subprocess.Popen(["sleep", "1000"])  # inherits HOLDER_SECRET
            _probe.report("probe.holder", f"{os.getpid()} {child.pid}")
            return "ok"
    """,
    )
    write_handler(
        handlers,
        "snoop",
        """
        def read(path):
            try:
                return "read: " + ("SECRET FOUND" if b"holder-only" in open(path, "rb").read() else "nothing")
            except OSError as exc:
                return type(exc).__name__

        def handler(event, context):
            files = ("environ", "mem")
            return {f"{pid} {what}": read(f"/proc/{pid}/{what}") for pid in event["pids"] for what in files}
    """,
    )
    service = await serve(
        extra_args=config_file(tmp_path, f"[workers]\nuser_namespace = {str(user_namespace).lower()}\n")
    )
    assert service.process is not None
    reported = await probe("probe.holder")
    assert await invoke(nc, "holder") == "ok"
    [text] = await reported.wait_for(1)
    worker, child = map(int, text.split())
    started.append(child)
    targets = [worker, service.process.pid] + ([child] if user_namespace else [])
    found = await invoke(nc, "snoop", {"pids": targets})
    assert found == {f"{pid} {what}": "PermissionError" for pid in targets for what in ("environ", "mem")}
    if not user_namespace:
        # Documented limit: without user namespaces, what a handler runs is dumpable again after exec.
        assert (await invoke(nc, "snoop", {"pids": [child]}))[f"{child} environ"] == "read: SECRET FOUND"  # type: ignore[index]


# -- processes a handler starts ----------------------------------------------------------------------------

SPAWNER = """
    # /// eventfn
    # timeout = 1
    # ///
    import os, subprocess, time
    import _probe

    def handler(event, context):
        detached = subprocess.Popen(["setsid", "sleep", "1000"])
        # A daemon: started by a shell that exits at once, so its parent is gone before the handler returns.
        daemon = subprocess.run(
            ["sh", "-c", "(setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!)"],
            capture_output=True, text=True, check=True,
        ).stdout
        _probe.report("probe.spawned", f"{event['case']} {detached.pid} {int(daemon)}")
        if event["case"] == "timeout":
            time.sleep(30)
        if event["case"] == "crash":
            os._exit(3)
        return "started"
"""

MODES = {
    # This machine and most root services: a cgroup per worker.
    "cgroup": "",
    # No writable cgroup v2 (a container, a service without systemd's Delegate=yes): the user namespace.
    "user-namespace": "[workers]\ncgroup = false\n",
    # Neither: the worker's descendants, found through /proc while it lives.
    "descendants": "[workers]\ncgroup = false\nuser_namespace = false\n",
}


async def spawn_case(
    nc: Client, reported, case: str, started: list[int], function: str = "spawner"
) -> tuple[object, list[int]]:
    """Invoke `function` with `case`; its reply and the pids of the detached child and the daemon it started."""
    before = len(reported.messages)
    reply = await invoke(nc, function, {"case": case})
    text = (await reported.wait_for(before + 1))[before]  # the report may arrive after the reply
    assert text.startswith(case)
    pids = [int(p) for p in text.split()[1:]]
    started.extend(pids)
    return reply, pids


@linux_only
@pytest.mark.e2e
@pytest.mark.parametrize("mode", list(MODES))
async def test_processes_a_handler_starts_end_with_its_worker(
    tmp_path: Path,
    handlers: Path,
    serve: Callable[..., Awaitable[Serve]],
    nc: Client,
    probe,
    started: list[int],
    mode: str,
) -> None:
    write_handler(handlers, "spawner", SPAWNER)
    write_handler(handlers, "retiree", SPAWNER.replace("probe.spawned", "probe.retiree"))
    service = await serve(extra_args=config_file(tmp_path, MODES[mode]))
    spawned = await probe("probe.spawned")
    # Without a cgroup or user namespace, a daemon whose parent exited is the init process's: out of reach.
    reach = slice(None) if mode != "descendants" else slice(0, 1)

    reply, pids = await spawn_case(nc, spawned, "timeout", started)
    assert reply["errorType"] == "Sandbox.Timedout"  # type: ignore[index]
    assert await await_gone(pids[reach]) == [], "after a timeout"

    if mode != "descendants":  # there the dead worker's children go to init at once
        reply, pids = await spawn_case(nc, spawned, "crash", started)
        assert reply["errorType"] == "Runtime.ExitError"  # type: ignore[index]
        assert await await_gone(pids) == [], "after the worker died"

    reply, pids = await spawn_case(nc, await probe("probe.retiree"), "idle", started, function="retiree")
    assert reply == "started" and not any(map(dead, pids))
    (handlers / "retiree.py").unlink()
    await wait_until(lambda: function_info(nc, "retiree"), lambda info: info is None, what="retiree removed")
    assert await await_gone(pids[reach]) == [], "after its function was removed"

    reply, pids = await spawn_case(nc, spawned, "idle", started)
    assert reply == "started"
    # Not `service.astop()`: it reads the log to its end, which never comes while a leftover holds its pipe.
    service.signal(signal.SIGTERM)
    assert await service.await_exit() == 0
    assert await await_gone(pids[reach]) == [], "after the service stopped"
    if mode == "cgroup":
        assert not list(Path(cgroups.own_cgroup()).glob(f"eventfn-{service.process.pid}")), "cgroups removed"  # type: ignore[union-attr]


@linux_only
@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["cgroup", "user-namespace"])
async def test_a_sigkilled_service_leaves_no_worker_and_nothing_they_started(
    tmp_path: Path,
    handlers: Path,
    serve: Callable[..., Awaitable[Serve]],
    nc: Client,
    probe,
    started: list[int],
    mode: str,
) -> None:
    write_handler(handlers, "spawner", SPAWNER.replace("# timeout = 1", "# timeout = 60"))
    write_handler(
        handlers,
        "busy",
        """
        import os, time
        import _probe

        def handler(event, context):
            _probe.report("probe.worker", str(os.getpid()))
            time.sleep(60)
        """,
    )
    service = await serve(extra_args=config_file(tmp_path, MODES[mode]))
    spawned = await probe("probe.spawned")
    worker = await probe("probe.worker")
    _, pids = await spawn_case(nc, spawned, "idle", started)
    await nc.publish("eventfn.async.busy", b"{}")
    [busy] = await worker.wait_for(1)
    started.append(int(busy))
    assert service.process is not None
    [zygote] = zygotes_of(service.process.pid)
    assert int(busy) in children_of(zygote), "the worker was forked by the zygote"
    service.signal(signal.SIGKILL)
    await service.await_exit()
    # The zygote and the workers it forked die with the service (PR_SET_PDEATHSIG: the zygote's parent is the
    # service, a worker's the zygote); with cgroups, the keeper kills what they started.
    assert await await_gone([zygote, int(busy), *(pids if mode == "cgroup" else [])]) == []


# -- users --------------------------------------------------------------------------------------------------


def _interpreter_for(uid: int, pythonpath: str) -> str | None:
    """A Python of this version that `uid` can run and import eventfn's dependencies with, if there is one."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        if not os.path.exists(candidate):
            continue
        try:
            done = subprocess.run(
                [candidate, "-c", "import sys, msgspec, anyio, nats, eventfn; print('%d.%d' % sys.version_info[:2])"],
                env={"PYTHONPATH": pythonpath, "PATH": os.environ.get("PATH", "")},
                user=uid,
                group=uid,
                extra_groups=[],
                capture_output=True,
                text=True,
                cwd="/",
                timeout=30,
            )
        except OSError:
            continue
        if done.returncode == 0 and done.stdout.strip() == version:
            return candidate
    return None


@linux_only
@pytest.mark.e2e
def test_a_root_service_that_cannot_switch_users_says_why_once(tmp_path: Path, nats_server: NatsServer) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs a service running as root")
    handlers = tmp_path / "private-handlers"  # pytest's tmp_path is private to root: nobody cannot read it
    handlers.mkdir(mode=0o700)
    (handlers / "_probe.py").write_text(PROBE_MODULE)
    with Serve(handlers, nats_server.url, tmp_path / "data") as service:
        text = service.log.text()
    warnings = [line for line in text.splitlines() if "workers run as root, not as nobody" in line]
    assert len(warnings) == 1, text
    reason = warnings[0].split("not as nobody: ", 1)[1]
    assert reason.startswith(("cannot run", "it cannot read", sys.executable)), reason
    assert 'set [workers] user = "root"' in reason


NOBODY = 65534


@pytest.fixture
def nobody_python() -> tuple[str, str]:
    """A Python that uid 65534 can run, with the PYTHONPATH that gives it eventfn; skips without one."""
    if not sandbox.LINUX or os.geteuid() != 0:
        pytest.skip("needs Linux and a test run as root")
    site = str(Path(msgspec.__file__).parent.parent)
    pythonpath = f"{Path(eventfn.__file__).parent.parent}:{site}"
    interpreter = _interpreter_for(NOBODY, pythonpath)
    if interpreter is None:
        pytest.skip("no Python of this version that uid 65534 can run with eventfn's dependencies")
    return interpreter, pythonpath


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder other users can read (pytest's own are root's alone), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="eventfn-users-"))
    path.chmod(0o755)
    (path / "handlers").mkdir(mode=0o755)
    (path / "handlers" / "_probe.py").write_text(PROBE_MODULE)
    yield path
    shutil.rmtree(path)


@pytest.mark.e2e
async def test_a_root_service_runs_workers_as_an_unprivileged_user(
    tmp_path: Path, nats_server: NatsServer, nobody_python: tuple[str, str], shared: Path
) -> None:
    interpreter, pythonpath = nobody_python
    private = shared / "root-only.txt"
    private.write_text("root's")
    private.chmod(0o600)
    write_handler(
        shared / "handlers",
        "whoami",
        f"""
        import os

        def handler(event, context):
            try:
                text = open({str(private)!r}).read()
            except OSError as exc:
                text = type(exc).__name__
            return {{"uid": os.getuid(), "private": text, "home": os.environ.get("HOME"), "parent": os.getppid()}}
        """,
    )
    service = Serve(shared / "handlers", nats_server.url, tmp_path / "data", env={"PYTHONPATH": pythonpath})
    service.args[0] = interpreter
    async with service:
        await service.log.await_line(r"workers run as nobody \(uid 65534\).*own user namespace.*own cgroup")
        nc = await nats.connect(nats_server.url)
        try:
            seen = await invoke(nc, "whoami")
            assert isinstance(seen, dict) and service.process is not None
            # Forked by the zygote, which runs as the worker user too.
            assert zygotes_of(service.process.pid) == [seen.pop("parent")]
            assert os.stat(f"/proc/{zygotes_of(service.process.pid)[0]}").st_uid == NOBODY
        finally:
            await nc.close()
    assert seen == {"uid": NOBODY, "private": "PermissionError", "home": "/nonexistent"}


@pytest.mark.e2e
@pytest.mark.parametrize("user_namespace", [True, False], ids=["own-user-namespace", "shared-user-namespace"])
async def test_workers_of_a_non_root_service_cannot_read_its_environment(
    nats_server: NatsServer, nobody_python: tuple[str, str], shared: Path, user_namespace: bool
) -> None:
    """The shipped systemd unit's shape: the service and its workers share one uid (no capabilities either)."""
    interpreter, pythonpath = nobody_python
    write_handler(
        shared / "handlers",
        "peek",
        """
        import os

        def handler(event, context):
            try:
                return open(f"/proc/{event['service']}/environ", "rb").read().decode(errors="replace")
            except OSError as exc:
                return type(exc).__name__
        """,
    )
    data = shared / "data"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)
    (shared / "eventfn.toml").write_text(f"[workers]\nuser_namespace = {str(user_namespace).lower()}\n")
    service = Serve(
        shared / "handlers",
        nats_server.url,
        data,
        extra_args=["--config", str(shared / "eventfn.toml")],
        env={"PYTHONPATH": pythonpath, "SECRET_DB_PASSWORD": "hunter2"},
    )
    service.args[:1] = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", interpreter]
    async with service:
        if user_namespace:
            await service.log.await_line(r"workers run as uid 65534, like the service.*own user namespace")
        else:
            await service.log.await_line(r"the service made itself non-dumpable")
        assert service.process is not None
        nc = await nats.connect(nats_server.url)
        try:
            seen = await invoke(nc, "peek", {"service": service.process.pid})
        finally:
            await nc.close()
    assert seen == "PermissionError"


# -- the pieces on their own --------------------------------------------------------------------------------


@linux_only
def test_kill_tree_reaches_a_daemon_through_the_user_namespace(tmp_path: Path) -> None:
    """A daemon whose parent exited is found by its user namespace, even after the worker itself died."""
    script = """
import os, subprocess, sys
from eventfn import sandbox
sandbox.enter_user_namespace(sandbox.libc())
daemon = "(setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!)"
print(subprocess.run(["sh", "-c", daemon], capture_output=True, text=True).stdout.strip(), flush=True)
sys.stdin.read()
"""
    daemon = 0
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as root:
        try:
            assert root.stdout is not None
            daemon = int(root.stdout.readline())
            namespace = os.stat(f"/proc/{root.pid}/ns/user").st_ino
            assert os.stat(f"/proc/{daemon}/ns/user").st_ino == namespace
            root.kill()  # the "worker" dies first, as a crash would; not reaped yet, as in `Worker.kill`
            assert wait_gone([root.pid]) == [] and not dead(daemon)
            isolation.kill_tree(None, namespace)  # reaped or not, the namespace alone finds it
            assert wait_gone([daemon]) == []
        finally:
            if daemon:
                try:
                    os.kill(daemon, signal.SIGKILL)
                except OSError:
                    pass
            root.kill()
