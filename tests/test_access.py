"""Access control: who may invoke, read, answer and administer, against real nats-server processes.

Every claim of README "Security and isolation" is checked here twice: on the embedded server that
`eventfn serve` starts (anonymous clients and the generated credentials), and on a nats-server started with
the example configuration `deploy/nats-server.conf` (the same roles, on a NATS you run yourself).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from eventfn.broker import auth
from eventfn.config import AuthSettings, NatsSettings, ServiceConfig, environment_overrides, load_service_config
from eventfn.errors import ConfigError
from eventfn.testing import NatsServer, Serve, write_handler
from tests.conftest import at_once

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent

ECHO = """
    # /// eventfn
    # triggers = ["events.access.>"]
    # ///
    def handler(event, context):
        print("echoed", event.get("marker"))
        return {"echo": event}
"""
FAIL = """
    # /// eventfn
    # retry = { max_attempts = 0 }
    # ///
    def handler(event, context):
        raise RuntimeError("always")
"""


class Peer:
    """A NATS client as a user would run one, with the errors the server sends it (it sends them
    asynchronously: a refused publish or subscription is an error message, not an exception)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._changed = asyncio.Event()
        self.nc = Client()

    @classmethod
    async def connect(cls, url: str, **options: Any) -> Peer:
        peer = cls()

        async def on_error(exc: Exception) -> None:
            peer.errors.append(str(exc))
            peer._changed.set()

        try:
            await peer.nc.connect(url, error_cb=on_error, allow_reconnect=False, **options)
        except BaseException:
            await peer.nc.close()  # a refused connection leaves its socket open otherwise
            raise
        return peer

    async def refused(self, what: str, timeout: float = 15.0) -> None:
        """Wait until the server reports a permissions violation for `what` (e.g. 'publish to "x"')."""
        pattern = re.compile("permissions violation for " + re.escape(what.lower()))
        async with asyncio.timeout(timeout):
            while not any(pattern.search(e) for e in self.errors):
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        await self.nc.close()


class Seen:
    """Message bodies a subscription received, with a wait for one that contains some bytes."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self._changed = asyncio.Event()

    async def add(self, msg: Msg) -> None:
        self.data.append(msg.data)
        self._changed.set()

    async def wait_for(self, part: bytes, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while not any(part in data for data in self.data):
                self._changed.clear()
                await self._changed.wait()


class Roles:
    """How to reach one eventfn deployment: its URL and the connect options of its users."""

    def __init__(self, serve: Serve, url: str, options: dict[str, dict[str, Any]]) -> None:
        self.serve = serve
        self.url = url
        self.options = options

    async def peer(self, role: str) -> Peer:
        return await Peer.connect(self.url, **self.options.get(role, {}))


async def dlq_count(roles: Roles) -> int:
    service = await roles.peer(auth.SERVICE)
    try:
        return (await service.nc.jetstream().stream_info("EVENTFN_DLQ")).state.messages
    finally:
        await service.close()


async def check_confined(roles: Roles, role: str) -> None:
    """`role` may invoke (sync, async, trigger) and nothing more: no JetStream API, no DLQ purge, no
    answering in the service's place, no reading of others' events or replies."""
    serve, caller = roles.serve, await roles.peer(role)
    admin = await roles.peer(auth.ADMIN)
    try:
        marker = secrets.token_hex(4)
        reply = await caller.nc.request("eventfn.invoke.echo", json.dumps({"marker": marker}).encode(), timeout=20)
        assert json.loads(reply.data) == {"echo": {"marker": marker}}
        mark = serve.log.mark()
        await caller.nc.publish("eventfn.async.echo", json.dumps({"marker": f"async-{marker}"}).encode())
        await caller.nc.publish(f"events.access.{marker}", json.dumps({"marker": f"trigger-{marker}"}).encode())
        await caller.nc.flush()
        await serve.log.await_line(rf"echoed async-{marker}", start=mark, timeout=30)
        await serve.log.await_line(rf"echoed trigger-{marker}", start=mark, timeout=30)

        # A DLQ record to guard, made by this check itself.
        await caller.nc.publish("eventfn.async.fail", json.dumps({"marker": marker}).encode())
        await caller.nc.flush()
        await serve.log.await_line(r"fail: request \S+ dead-lettered", start=mark, timeout=30)
        records = await dlq_count(roles)
        assert records >= 1

        # The JetStream API, directly: refused.
        for subject in ("$JS.API.STREAM.PURGE.EVENTFN_DLQ", "$JS.API.STREAM.DELETE.EVENTFN", "$JS.API.INFO"):
            await caller.nc.publish(subject, b"")
            await caller.refused(f'publish to "{subject}"')
        # ...and through the service: a request naming the purge as its reply subject is not answered there.
        # (A 404 is answered at once, and requests are handled in arrival order: once the request after it is
        # answered, this one was too. Its log line is rate-limited, see below.)
        await caller.nc.publish("eventfn.invoke.nosuch", b"{}", reply="$JS.API.STREAM.PURGE.EVENTFN_DLQ")
        after = await caller.nc.request("eventfn.invoke.nosuch", b"{}", timeout=10)
        assert after.headers and after.headers["Eventfn-Status"] == "404"
        # Nor the control API or the DLQ subjects.
        for subject in ("eventfn.api.functions", "eventfn.api.mappings.disable", "eventfn.dlq.echo"):
            await caller.nc.publish(subject, b"{}")
            await caller.refused(f'publish to "{subject}"')
        assert await dlq_count(roles) == records

        # Answering in the service's place, reading what others publish and what the service receives.
        await caller.nc.subscribe("eventfn.invoke.*", queue="eventfn")
        await caller.refused('subscription to "eventfn.invoke.*" using queue "eventfn"')
        for subject in (">", "eventfn.invoke.*", "events.>", "_INBOX_eventfn_service.>", "_INBOX_eventfn_admin.>"):
            await caller.nc.subscribe(subject)
            await caller.refused(f'subscription to "{subject}"')
        other_prefix = "_INBOX" if role != auth.ANONYMOUS else auth.INBOX_PREFIXES[auth.INVOKER]
        await caller.nc.subscribe(other_prefix + ".>")
        await caller.refused(f'subscription to "{other_prefix}.>"')

        # Reading replies: the widest subscription the caller may make sees its own replies only.
        own_prefix = auth.INBOX_PREFIXES[role]
        seen = Seen()
        await caller.nc.subscribe(own_prefix + ".>", cb=seen.add)
        witnesses = [admin] + ([await roles.peer(auth.INVOKER)] if role == auth.ANONYMOUS else [])
        for i, witness in enumerate(witnesses):
            answer = await witness.nc.request("eventfn.invoke.echo", b'{"marker": "witness-%d"}' % i, timeout=20)
            assert json.loads(answer.data) == {"echo": {"marker": f"witness-{i}"}}
        # The service sends replies in order: once the caller's own last reply reached the snoop, any reply sent
        # before it (the witnesses') would have too.
        await caller.nc.request("eventfn.invoke.echo", b'{"marker": "last"}', timeout=20)
        await seen.wait_for(b'"last"')  # the snoop's copy travels beside the request's own
        assert all(b"witness" not in data for data in seen.data), seen.data
        for witness in witnesses[1:]:
            await witness.close()
    finally:
        await caller.close()
        await admin.close()


# -- the embedded server -------------------------------------------------------------------------------------


def login(service: Serve, role: str) -> dict[str, Any]:
    """The user, password and inbox prefix of `role` on the service's embedded server."""
    return {k: v for k, v in service.connect_options(role).items() if k != "servers"}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Roles]:
    """One `eventfn serve` with its embedded server for the checks that leave it as they found it (`doomed` is
    the admin check's: it redrives and purges that function's dead letters only)."""
    root = tmp_path_factory.mktemp("embedded")
    handlers = root / "handlers"
    handlers.mkdir()
    write_handler(handlers, "echo", ECHO)
    write_handler(handlers, "fail", FAIL)
    write_handler(handlers, "doomed", FAIL)
    with Serve(handlers, None, root / "data") as service:
        yield Roles(
            service,
            service.url,
            {role: login(service, role) for role in auth.ROLES} | {auth.ANONYMOUS: {}},
        )


@pytest.mark.parametrize("role", [auth.ANONYMOUS, auth.INVOKER])
async def test_a_caller_may_invoke_and_nothing_more(embedded: Roles, role: str) -> None:
    await check_confined(embedded, role)


async def test_anonymous_callers_share_one_identity_so_one_can_read_anothers_replies(embedded: Roles) -> None:
    # The documented limit (README "Security and isolation"): NATS permissions are per user, and every client
    # without credentials is the same user. Callers that need private replies use credentials.
    snooper, victim = await embedded.peer(auth.ANONYMOUS), await embedded.peer(auth.ANONYMOUS)
    seen = Seen()
    try:
        await snooper.nc.subscribe("_INBOX.*.*", cb=seen.add)
        await snooper.nc.flush()
        await victim.nc.request("eventfn.invoke.echo", b'{"marker": "private"}', timeout=20)
        await seen.wait_for(b'"private"')
    finally:
        await snooper.close()
        await victim.close()


async def test_wrong_credentials_are_refused(embedded: Roles) -> None:
    good = embedded.serve.credentials(auth.ADMIN)
    for user, password in [(good.user, "wrong"), (auth.INVOKER, good.password), (auth.ANONYMOUS, "")]:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await Peer.connect(embedded.url, user=user, password=password, max_reconnect_attempts=0)
    context = embedded.serve.data_dir / "wrong.json"
    context.write_text(json.dumps({"url": embedded.url, "user": "admin", "password": "wrong"}))
    result = await embedded.serve.acli("functions", env={"EVENTFN_NATS_CONTEXT": str(context)})
    assert result.returncode == 1
    assert "refused these credentials" in result.stderr and "Traceback" not in result.stderr


async def test_credentials_are_private_files_the_cli_finds(embedded: Roles) -> None:
    directory = auth.auth_dir(embedded.serve.data_dir)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in [*directory.iterdir(), embedded.serve.data_dir / "nats-server.conf"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    admin = embedded.serve.credentials(auth.ADMIN)
    assert admin.url == embedded.url and admin.inbox_prefix == "_INBOX_eventfn_admin"
    # The CLI connects as admin with nothing but the data directory to go on; an invoker's context does not
    # reach the DLQ. (The three commands are independent: they run at once.)
    invoker = {"EVENTFN_NATS_CONTEXT": str(auth.context_file(embedded.serve.data_dir, auth.INVOKER))}
    functions, dead, denied = await at_once(
        embedded.serve.acli("functions", "--json"),
        embedded.serve.acli("dlq", "ls", "--json"),
        embedded.serve.acli("dlq", "ls", env=invoker),
    )
    assert functions.returncode == 0, functions.stderr
    assert {f["name"] for f in json.loads(functions.stdout)} == {"echo", "fail", "doomed"}
    assert dead.returncode == 0, dead.stderr
    # An invoker's context does not reach the DLQ: one clear line, at once.
    assert denied.returncode == 1
    assert 'refused it: permissions violation for publish to "$js.api.stream.msg.get.eventfn_dlq"' in denied.stderr
    assert denied.stderr.count("\n") == 1, denied.stderr


async def test_admin_may_administer_and_invoke(embedded: Roles) -> None:
    await check_admin(embedded.serve, {})


async def check_admin(service: Serve, env: dict[str, str]) -> None:
    """The CLI, as admin: functions, mappings, invoke, pub, and the DLQ from listing to purge."""
    mark = service.log.mark()
    assert (await service.acli("invoke", "doomed", "--async", '{"n": 1}', env=env)).returncode == 0
    await service.log.await_line(r"doomed: request \S+ dead-lettered", start=mark, timeout=30)
    listed = await service.acli("dlq", "ls", "doomed", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    (record,) = json.loads(listed.stdout)
    shown = await service.acli("dlq", "show", str(record["id"]), env=env)
    assert shown.returncode == 0 and '"n": 1' in shown.stdout, shown.stderr
    mark = service.log.mark()
    redriven = await service.acli("dlq", "redrive", "doomed", "--id", str(record["id"]), env=env)
    assert redriven.returncode == 0 and "1 record(s) redriven" in redriven.stdout, redriven.stderr
    await service.log.await_line(r"doomed: request \S+ dead-lettered", start=mark, timeout=30)  # it fails again
    commands = [("functions",), ("mappings",), ("invoke", "echo", '{"marker": "admin"}'), ("pub", "events.x", "{}")]
    for args, result in zip(commands, await at_once(*(service.acli(*args, env=env) for args in commands)), strict=True):
        assert result.returncode == 0, (args, result.stderr)
    assert (await service.acli("mappings", "disable", "echo--t0", env=env)).returncode == 0
    assert (await service.acli("mappings", "enable", "echo--t0", env=env)).returncode == 0
    purged = await service.acli("dlq", "purge", "doomed", env=env)
    assert purged.returncode == 0 and "1 record(s) of doomed purged" in purged.stdout, purged.stderr


async def test_credentials_stay_across_restarts_and_can_be_your_own(tmp_path: Path, handlers: Path) -> None:
    write_handler(handlers, "echo", ECHO)
    async with Serve(handlers, None, tmp_path / "data") as first:
        before = {role: first.credentials(role) for role in auth.ROLES}
    async with Serve(handlers, None, tmp_path / "data", env={"EVENTFN_NATS_ADMIN_PASSWORD": "chosen-by-me"}) as second:
        after = {role: second.credentials(role) for role in auth.ROLES}
        assert after[auth.ADMIN].password == "chosen-by-me"
        for role in (auth.SERVICE, auth.INVOKER):
            assert after[role].password == before[role].password
        peer = await Peer.connect(
            second.url, user="admin", password="chosen-by-me", inbox_prefix="_INBOX_eventfn_admin"
        )
        reply = await peer.nc.request("eventfn.api.functions", b"", timeout=20)
        assert [f["name"] for f in json.loads(reply.data)] == ["echo"]
        await peer.close()


async def test_anonymous_access_can_be_turned_off(tmp_path: Path, handlers: Path) -> None:
    write_handler(handlers, "echo", ECHO)
    (tmp_path / "eventfn.toml").write_text("[nats.auth]\nanonymous = false\n")
    async with Serve(handlers, None, tmp_path / "data", cwd=tmp_path) as service:
        await service.log.await_line(r"clients without credentials are refused")
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await Peer.connect(service.url, max_reconnect_attempts=0)
        invoker = await Peer.connect(service.url, **login(service, auth.INVOKER))
        reply = await invoker.nc.request("eventfn.invoke.echo", b'{"marker": 1}', timeout=20)
        assert json.loads(reply.data) == {"echo": {"marker": 1}}
        await invoker.close()


def test_anonymous_access_is_off_by_default_beyond_loopback() -> None:
    assert auth.anonymous_allowed(NatsSettings(host="127.0.0.1"))
    assert auth.anonymous_allowed(NatsSettings(host="::1"))
    assert not auth.anonymous_allowed(NatsSettings(host="0.0.0.0"))
    assert not auth.anonymous_allowed(NatsSettings(host="10.1.2.3"))
    assert auth.anonymous_allowed(NatsSettings(host="10.1.2.3", auth=AuthSettings(anonymous=True)))
    assert not auth.anonymous_allowed(NatsSettings(auth=AuthSettings(anonymous=False)))
    credentials = {auth.ADMIN: auth.Context(user="admin", password="pw")}
    assert "no_auth_user" in auth.server_config(credentials, NatsSettings(), ["events.>"])
    assert "no_auth_user" not in auth.server_config(credentials, NatsSettings(host="0.0.0.0"), ["events.>"])


@pytest.mark.parametrize(
    ("flag", "setting"),
    [(["--token", "s3cret"], "token"), (["--creds", "/tmp/x.creds"], "creds"), (["--tls-ca", "ca.pem"], "tls_ca")],
)
def test_client_credentials_without_a_nats_url_are_a_clear_error(
    tmp_path: Path, handlers: Path, flag: list[str], setting: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "eventfn", "serve", "--handlers", str(handlers), "--nats-port", "0", *flag],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"[nats] {setting}" in result.stderr and "--nats URL" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / ".eventfn" / "nats-server.conf").exists()


# -- the example configuration for a NATS you run -----------------------------------------------------------


@pytest.fixture
def deployed(tmp_path: Path, handlers: Path) -> Iterator[tuple[Roles, dict[str, str]]]:
    """nats-server with deploy/nats-server.conf, and `eventfn serve --nats URL` as its service user."""
    # A letter first: nats-server parses a variable's value, and may read one starting with a digit or `-` as a number.
    passwords = {role: "p" + secrets.token_urlsafe(16) for role in auth.ROLES}
    env = {f"EVENTFN_{role.upper()}_PASSWORD": password for role, password in passwords.items()}
    write_handler(handlers, "echo", ECHO)
    write_handler(handlers, "fail", FAIL)
    write_handler(handlers, "doomed", FAIL)
    # The example as shipped, but for where it keeps its store (a flag cannot override a store_dir in the file).
    example = (ROOT / "deploy" / "nats-server.conf").read_text()
    store_line = '  store_dir: "/var/lib/nats"\n'
    assert example.count(store_line) == 1
    config = tmp_path / "nats-server.conf"
    config.write_text(example.replace(store_line, f'  store_dir: "{tmp_path / "nats"}"\n'))
    with NatsServer(tmp_path / "nats", config=config, env=env) as server:
        serve_env = {"EVENTFN_NATS_USER": auth.SERVICE, "EVENTFN_NATS_PASSWORD": passwords[auth.SERVICE]}
        with Serve(handlers, server.url, tmp_path / "data", env=serve_env) as service:
            options = {
                role: {"user": role, "password": passwords[role], "inbox_prefix": auth.INBOX_PREFIXES[role]}
                for role in auth.ROLES
            }
            # The admin's nats context file, as deploy/README.md tells an operator to write it.
            context = tmp_path / "admin.json"
            context.write_text(json.dumps({"url": server.url, **options[auth.ADMIN]}))
            yield Roles(service, server.url, options), {"EVENTFN_NATS_CONTEXT": str(context)}


async def test_example_config_confines_invokers(deployed: tuple[Roles, dict[str, str]]) -> None:
    roles, _ = deployed
    await check_confined(roles, auth.INVOKER)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await Peer.connect(roles.url, max_reconnect_attempts=0)  # no anonymous access in the example
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await Peer.connect(roles.url, user=auth.ADMIN, password="wrong", max_reconnect_attempts=0)


async def test_example_config_lets_admins_administer(deployed: tuple[Roles, dict[str, str]]) -> None:
    roles, admin_env = deployed
    await check_admin(roles.serve, admin_env)


# -- the pieces ----------------------------------------------------------------------------------------------


async def test_generated_config_takes_any_password_nats_can(tmp_path: Path) -> None:
    odd = 'quote" back\\slash $HOME {brace} # hash ünï'
    credentials = auth.load_credentials(tmp_path, AuthSettings(admin_password=odd))
    config = tmp_path / "server.conf"
    config.write_text(
        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        + auth.server_config(credentials, NatsSettings(), ["events.>"])
    )
    async with NatsServer(tmp_path / "js", config=config) as server:
        peer = await Peer.connect(server.url, user="admin", password=odd, inbox_prefix="_INBOX_eventfn_admin")
        await peer.close()
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await Peer.connect(server.url, user="admin", password=odd[:-1], max_reconnect_attempts=0)


@pytest.mark.parametrize(("password", "problem"), [("$2a$11$abc", "bcrypt"), ("a\nb", "control"), ("", "empty")])
def test_own_passwords_nats_would_misread_are_refused(tmp_path: Path, password: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        auth.load_credentials(tmp_path, AuthSettings(invoker_password=password))


@pytest.mark.parametrize("subject", [">", "$JS.API.>", "eventfn.dlq.x", "bad subject"])
def test_extra_publish_subjects_cannot_open_what_the_roles_close(tmp_path: Path, subject: str) -> None:
    config = ServiceConfig(data_dir=str(tmp_path), nats=NatsSettings(auth=AuthSettings(publish=[subject])))
    with pytest.raises(ConfigError, match=r"\[nats.auth\] publish"):
        auth.EmbeddedAuth(config)


def test_own_passwords_come_from_settings_or_environment(tmp_path: Path) -> None:
    (tmp_path / "eventfn.toml").write_text('[nats.auth]\nservice_password = "from-file"\nanonymous = false\n')
    environ = {"EVENTFN_NATS_ADMIN_PASSWORD": "from-env", "EVENTFN_NATS_CONTEXT": "ctx.json"}
    config = load_service_config(tmp_path / "eventfn.toml", environment_overrides(environ))
    assert config.nats.auth == AuthSettings(service_password="from-file", admin_password="from-env", anonymous=False)
    assert config.nats.context == "ctx.json"


def test_admin_credentials_go_only_to_the_server_that_wrote_them(tmp_path: Path) -> None:
    config = ServiceConfig(data_dir=str(tmp_path))
    assert auth.admin_context(config, ["nats://127.0.0.1:4222"]) is None  # none written yet
    credentials = auth.load_credentials(tmp_path, AuthSettings())
    auth.write_credentials(tmp_path, credentials, "nats://127.0.0.1:4321")
    for same in ("nats://127.0.0.1:4321", "127.0.0.1:4321", "tls://127.0.0.1:4321"):
        found = auth.admin_context(config, [same])
        assert found is not None and found.password == credentials[auth.ADMIN].password
    for other in ("nats://127.0.0.1:4222", "nats://10.0.0.1:4321", "nats://localhost:4321"):
        assert auth.admin_context(config, [other]) is None


def test_urls_lose_their_credentials_before_they_are_logged() -> None:
    assert auth.redact("nats://service:s3cret@127.0.0.1:4222") == "nats://127.0.0.1:4222"
    assert auth.redact("tls://t0ken@[::1]:4222") == "tls://[::1]:4222"
    assert auth.redact("nats://10.0.0.1:4222") == "nats://10.0.0.1:4222"


async def test_a_reconnect_after_the_server_restarts_logs_no_password(tmp_path: Path, handlers: Path) -> None:
    """nats-py keeps the URL as it was given, credentials included; the reconnect log line printed it."""
    password = "pw-" + secrets.token_hex(8)
    server = await NatsServer(tmp_path / "nats", args=["--user", "service", "--pass", password]).astart()
    try:
        url = server.url.replace("nats://", f"nats://service:{password}@")
        async with Serve(handlers, url, tmp_path / "data") as service:
            await server.astop()
            await service.log.await_line(r"NATS: disconnected from")
            await server.astart()  # same port, same store
            line = await service.log.await_line(r"NATS: reconnected to (.*)", timeout=30)
            assert password not in service.log.text()
            assert line.group(1) == server.url, "the server is named by its URL, not by a parse result"
    finally:
        await server.astop()


SUBJECTS = """
    # /// eventfn
    # triggers = ["events.spoof.>"]
    # ///
    from _probe import report

    def handler(event, context):
        report("spoof.seen", context.cloud_event["source"] + " " + context.cloud_event["subject"])
"""


async def test_a_publisher_cannot_choose_the_subject_the_handler_sees(
    handlers: Path, serve: Any, nc: Client, probe: Any
) -> None:
    """`Eventfn-Subject` carries a redriven event's first subject; only a redrive (which only the admin may
    publish) sets it. From anyone else it would let a client allowed one subject pose as another."""
    write_handler(handlers, "spoof", SUBJECTS)
    await serve()
    seen = await probe("spoof.seen")
    forged = {"Eventfn-Subject": "payments.refund.approved"}
    await nc.publish("events.spoof.public", b'{"n": 1}', headers=forged)
    await nc.publish("eventfn.async.spoof", b'{"n": 2}', headers=forged)
    assert sorted(await seen.wait_for(2)) == [
        "nats:eventfn.async.spoof eventfn.async.spoof",
        "nats:events.spoof.public events.spoof.public",
    ]


async def test_a_refused_publish_from_the_cli_is_an_error_not_a_core_publish(embedded: Roles) -> None:
    """The admin may not touch the JetStream API: `eventfn pub` there says the server refused it, exits 1,
    and does not fall back to a core publish as it does for a subject no stream stores."""
    service = embedded.serve
    refused, stored = await at_once(
        service.acli("pub", "$JS.API.STREAM.DELETE.EVENTFN", "{}"), service.acli("pub", "events.access.x", "{}")
    )
    assert refused.returncode == 1, refused.stdout
    assert refused.stderr.startswith("eventfn: error: the NATS server refused"), refused.stderr
    assert "core NATS" not in refused.stderr and "Traceback" not in refused.stderr
    assert stored.returncode == 0 and json.loads(stored.stdout)["sequence"] >= 1, stored.stderr


async def test_an_unknown_function_is_not_found_without_naming_the_others(embedded: Roles) -> None:
    """Anonymous callers may not list functions (the control API is the admin's): a 404 names only what
    they asked for, as Lambda's does."""
    nc = await nats.connect(embedded.url)
    try:
        reply = await nc.request("eventfn.invoke.nosuch", b"{}", timeout=10)
    finally:
        await nc.close()
    assert reply.headers and reply.headers["Eventfn-Status"] == "404"
    assert json.loads(reply.data)["errorMessage"] == "Function not found: nosuch"


async def test_requests_naming_a_refused_reply_subject_are_logged_at_most_once_a_minute(
    handlers: Path, serve: Any, nc: Client
) -> None:
    """Any client may name a NATS API subject as its reply: none is answered there, and a flood of them
    is one log line (with a count on the next), not one each."""
    write_handler(handlers, "echo", ECHO)
    service = await serve()
    mark = service.log.mark()
    for n in range(50):  # each is answered at once (404), so each reply is refused in turn
        await nc.publish("eventfn.invoke.nosuch", b"{}", reply=f"$JS.API.STREAM.PURGE.EVENTFN_DLQ.{n}")
    # Requests are handled in arrival order: once this one is answered, the 50 before it were too.
    answered = await nc.request("eventfn.invoke.nosuch", b"{}", timeout=10)
    assert answered.headers and answered.headers["Eventfn-Status"] == "404"
    await service.log.await_line(r"named reply subject .*not answered there", start=mark)
    lines = [line for line in service.log.lines[mark:] if "not answered there" in line]
    assert len(lines) == 1, lines
