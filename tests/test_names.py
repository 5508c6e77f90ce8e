"""Function names: which file names can be functions, and what happens to the files whose names cannot."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client

from eventfn.config import name_problem, read_function_settings
from eventfn.errors import ConfigError
from eventfn.invoke.registry import scan
from eventfn.testing import Serve, write_handler

HANDLER = "def handler(event, context):\n    return event\n"


@pytest.mark.parametrize("name", ["hello", "Hello2", "a", "9lives", "snake_case", "kebab-case", "x" * 64, "a-b_c-1"])
def test_valid_names(name: str) -> None:
    assert name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("-dash", "starts with '-'"),
        ("_private", "starts with '_'"),
        ("my func", "whitespace"),
        ("tab\tname", "whitespace"),
        ("a.b", "'.'"),
        ("a*", "'*'"),
        ("a>", "'>'"),
        ("café", "non-ASCII"),
        ("x" * 65, "65 characters long"),
        ("a--b", "`--`"),
        ("a/b", "'/'"),
        ("a$b", "'$'"),
    ],
)
def test_invalid_names_come_with_the_reason(name: str, reason: str) -> None:
    problem = name_problem(name)
    assert problem is not None and reason in problem


def test_a_trigger_name_follows_the_same_rule(tmp_path: Path) -> None:
    entry = tmp_path / "fn.py"
    entry.write_text('# /// eventfn\n# triggers = [{ subjects = ["events.x"], name = "-t" }]\n# ///\n' + HANDLER)
    with pytest.raises(ConfigError, match="trigger name '-t' is invalid: it starts with '-'"):
        read_function_settings("fn", entry, None, {})


# -- discovery ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def handlers_dir(tmp_path: Path) -> Path:
    path = tmp_path / "handlers"
    path.mkdir()
    return path


def test_files_that_would_be_functions_but_cannot_be_named_so_are_reported(handlers_dir: Path) -> None:
    for stem in ("my func", "-dash", "a.b", "café", "x" * 65):
        (handlers_dir / f"{stem}.py").write_text(HANDLER)
    (handlers_dir / "settings.only.py").write_text("# /// eventfn\n# timeout = 5\n# ///\n")
    (handlers_dir / "bad dir").mkdir()
    (handlers_dir / "bad dir" / "lambda_function.py").write_text(HANDLER)
    (handlers_dir / "good.py").write_text(HANDLER)
    found = scan(handlers_dir)
    assert set(found.functions) == {"good"}
    assert set(found.invalid) == {
        "my func.py",
        "-dash.py",
        "a.b.py",
        "café.py",
        "x" * 65 + ".py",
        "settings.only.py",
        "bad dir/",
    }
    assert "'-dash' is not a valid function name: it starts with '-'" in found.invalid["-dash.py"]
    assert "rename the folder" in found.invalid["bad dir/"]


def test_an_invalid_name_is_neither_a_function_nor_a_helper_and_changing_it_reloads_nothing(
    handlers_dir: Path,
) -> None:
    (handlers_dir / "good.py").write_text(HANDLER)
    (handlers_dir / "notes.v2.py").write_text("X = 1\n")  # no entry point, and not importable either
    before = scan(handlers_dir)
    assert set(before.invalid) == {"notes.v2.py"}
    (handlers_dir / "notes.v2.py").write_text("X = 2\n")
    (handlers_dir / "my func.py").write_text(HANDLER)
    assert scan(handlers_dir).functions["good"].version == before.functions["good"].version


def test_an_importable_helper_with_a_name_no_function_could_have_is_still_a_helper(handlers_dir: Path) -> None:
    (handlers_dir / "good.py").write_text("import café\n" + HANDLER)
    (handlers_dir / "café.py").write_text("X = 1\n")
    before = scan(handlers_dir)
    assert before.invalid == {} and set(before.functions) == {"good"}
    (handlers_dir / "café.py").write_text("X = 2\n")
    assert scan(handlers_dir).functions["good"].version != before.functions["good"].version, "its users reload"


def test_a_plain_folder_with_an_invalid_name_is_not_reported(handlers_dir: Path) -> None:
    (handlers_dir / "data files").mkdir()
    (handlers_dir / "data files" / "table.csv").write_text("a,b\n")
    assert scan(handlers_dir).invalid == {}


# -- end to end --------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
async def test_invalid_file_names_are_reported_once_and_never_restart_other_functions(
    handlers: Path, serve: Callable[..., Awaitable[Serve]], nc: Client
) -> None:
    write_handler(handlers, "good", HANDLER)
    for stem in ("my func", "-dash", "a.b", "café"):
        write_handler(handlers, stem, HANDLER)
    service = await serve()
    for entry in ("my func.py", "-dash.py", "a.b.py", "café.py"):
        await service.log.await_line(rf"/{re.escape(entry)}' not loaded: .* is not a valid function name")

    infos = json.loads((await nc.request("eventfn.api.functions", b"", timeout=10)).data)
    states = {i["name"]: (i["state"], i["last_error"]) for i in infos}
    assert {name for name, (state, _) in states.items() if state == "Invalid"} == {
        "my func.py",
        "-dash.py",
        "a.b.py",
        "café.py",
    }
    assert states["good"] == ("Active", None)
    assert "it starts with '-'" in states["-dash.py"][1]
    reply = await nc.request("eventfn.invoke.-dash", b"{}", timeout=10)
    assert reply.headers["Eventfn-Status"] == "404", "a refused file is not a function under any subject"

    mark = service.log.mark()
    (handlers / "a.b.py").write_text(HANDLER + "# edited\n")
    (handlers / "notes.v2.py").write_text("X = 1\n")
    write_handler(handlers, "marker", HANDLER)  # a reload after the edits above has run once this loads
    await service.log.await_line(r"function marker loaded", start=mark)
    after = service.log.lines[mark:]
    assert not [line for line in after if "function good" in line], "the other functions kept their workers"
    [reported] = [line for line in after if "not loaded" in line]
    assert "/notes.v2.py' not loaded" in reported, "each refused file is reported once: only the new one now"
