"""The README's commands and examples are run here, so the docs cannot rot."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import anyio
import msgspec
import pytest
from nats.aio.client import Client

from eventfn.config import FunctionSettings, load_service_config
from eventfn.filters import compile_filters
from eventfn.testing import NatsServer, Serve, wait_serving

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_ci_runs_the_readme_test_command() -> None:
    test_command = next(b.strip() for b in blocks("sh") if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_readme_run_command_installs_and_serves() -> None:
    run_command = blocks("sh")[0].strip()
    assert run_command.endswith("eventfn serve") and "pip install ." in run_command


def test_quickstart_handler_is_the_shipped_example() -> None:
    assert blocks("python")[0] == (ROOT / "handlers" / "hello.py").read_text()


def test_settings_examples_are_valid(tmp_path: Path) -> None:
    """Each TOML example is valid function settings or valid service settings, and filters compile."""
    kinds = []
    for block in blocks("toml"):
        data = tomllib.loads(block)
        if "build-system" in data:  # the example connector's package (test_connector_example_is_the_tested_one)
            continue
        try:
            settings = msgspec.convert(data, FunctionSettings)
        except msgspec.ValidationError:
            # Service settings, read as `eventfn serve` reads them (connector tables such as [schedules] included).
            path = tmp_path / "eventfn.toml"
            path.write_text(block)
            load_service_config(path, {})
            kinds.append("service")
            continue
        for trigger in settings.trigger_list():
            compile_filters(trigger.filters, "README")
        kinds.append("function")
    assert kinds.count("service") >= 1 and kinds.count("function") >= 3


def test_connector_example_is_the_tested_one() -> None:
    """The README's third-party connector is, file for file, the package tests/test_connectors.py installs."""
    example = ROOT / "tests" / "connector_example"
    assert (example / "pyproject.toml").read_text() in blocks("toml")
    assert (example / "eventfn_lines.py").read_text() in blocks("python")


def test_json_examples_parse() -> None:
    for block in blocks("json"):
        assert isinstance(json.loads(block), dict)


@pytest.mark.e2e
async def test_quickstart_commands_give_what_the_readme_says(
    tmp_path: Path, nats_server: NatsServer, nc: Client
) -> None:
    handlers = copy_shipped_handlers(ROOT, tmp_path / "handlers")
    async with Serve(handlers, nats_server.url, tmp_path / "data") as service:
        states = {i["name"]: i["state"] for i in json.loads((await nc.request("eventfn.api.functions", b"")).data)}
        assert set(states.values()) == {"Active"}, f"every shipped example loads: {states}"
        assert {"hello", "orders", "ticker"} <= set(states)

        quickstart, after_new_file = blocks("sh")[2:4]
        mark = service.log.mark()
        await run_commands(quickstart, nc, nats_server.url)
        (handlers / "shout.py").write_text(blocks("python")[1])
        await wait_serving(nc, "shout")
        await run_commands(after_new_file, nc, nats_server.url)
        # The stored events (two trigger publishes, two async invokes) all ran.
        await service.log.await_line(r"greeting (Bob|Cy)", start=mark, count=4)


def copy_shipped_handlers(repo: Path, target: Path) -> Path:
    """Copy the examples that ship in `repo`'s handlers/ (the files git tracks) to `target`.

    Following the Quickstart leaves `handlers/shout.py` behind, and a user may add anything else there: the
    tests run what the repository ships, not what is in the folder today.
    """
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--", "handlers"], capture_output=True, check=True, timeout=30
    )
    target.mkdir(parents=True)
    for relative in filter(None, listed.stdout.decode().split("\0")):
        destination = target / Path(relative).relative_to("handlers")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / relative, destination)
    return target


def test_only_the_shipped_handlers_are_copied(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "handlers" / "folder").mkdir(parents=True)
    (repo / "handlers" / "hello.py").write_text("shipped\n")
    (repo / "handlers" / "folder" / "lambda_function.py").write_text("shipped too\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True, timeout=30)
    subprocess.run([*git, "add", "handlers"], check=True, timeout=30)
    subprocess.run([*git, "commit", "-qm", "examples"], check=True, timeout=30)
    (repo / "handlers" / "shout.py").write_text("what the Quickstart leaves behind\n")
    (repo / "handlers" / "hello.py").write_text("edited, not yet committed\n")

    copied = copy_shipped_handlers(repo, tmp_path / "copy")
    assert sorted(str(p.relative_to(copied)) for p in copied.rglob("*") if p.is_file()) == [
        "folder/lambda_function.py",
        "hello.py",
    ]
    assert (copied / "hello.py").read_text() == "edited, not yet committed\n", "the working copy is what is tested"


async def run_commands(block: str, nc: Client, url: str) -> None:
    """Run a README shell block: `nats req/pub` lines through the test's client, `eventfn` lines as processes."""
    for line in filter(None, (raw.strip() for raw in block.splitlines())):
        command, _, comment = line.partition("  #")
        words = shlex.split(command)
        if words[0] == "nats":
            subject, payload = words[2], words[3].encode()
            if words[1] == "pub":
                await nc.publish(subject, payload)
                continue
            reply = await nc.request(subject, payload, timeout=10)
            assert "Eventfn-Function-Error" not in (reply.headers or {}), reply.data
            if expected := re.search(r"-> (.*)$", comment):
                assert json.loads(reply.data) == json.loads(expected.group(1))
        else:
            assert words[0] == ".venv/bin/eventfn", line
            with anyio.fail_after(30):
                result = await anyio.run_process(
                    [sys.executable, "-m", "eventfn", *words[1:], "--nats", url], check=False
                )
            assert result.returncode == 0, (line, result.stderr.decode())
