"""What the service tells a user: settings errors with their line, each once, and a start-up hint that works."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from eventfn.config import load_service_config, read_function_settings
from eventfn.errors import ConfigError
from eventfn.testing import Serve, write_handler

HANDLER = "def handler(event, context):\n    return event\n"


def settings_error(entry: Path, sidecar: Path | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        read_function_settings("fn", entry, sidecar, {})
    return str(caught.value)


# -- TOML errors name their line ---------------------------------------------------------------------------------------


def test_inline_block_error_found_at_the_end_of_the_text_names_its_line(tmp_path: Path) -> None:
    entry = tmp_path / "fn.py"
    entry.write_text('"""Doc."""\n# /// eventfn\n# timeout = 5\n# description = "unclosed\n# ///\n' + HANDLER)
    message = settings_error(entry)
    assert message.startswith(f"{entry}:4: invalid TOML: Unterminated string"), message
    assert "end of document" not in message


def test_inline_block_error_names_the_file_line_and_column_not_the_blocks(tmp_path: Path) -> None:
    entry = tmp_path / "fn.py"
    entry.write_text("# /// eventfn\n# timeout = 5\n# [retry\n# max_attempts = 1\n# ///\n" + HANDLER)
    message = settings_error(entry)
    assert message.startswith(f"{entry}:3: invalid TOML: "), message
    assert "(column 7)" in message and "at line" not in message, "one line number: the file's"


def test_sidecar_error_found_at_the_end_of_the_text_names_its_line(tmp_path: Path) -> None:
    entry = tmp_path / "fn.py"
    entry.write_text(HANDLER)
    sidecar = tmp_path / "fn.toml"
    sidecar.write_text('timeout = 5\ntriggers = ["events.a",\n  "events.b",\n\n')
    assert settings_error(entry, sidecar).startswith(f"{sidecar}:3: invalid TOML: Invalid value")


def test_service_settings_error_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "eventfn.toml"
    path.write_text('handlers = "fns"\n[nats]\nurl = ["nats://a:4222",\n')
    with pytest.raises(ConfigError, match=rf"^{path}:3: invalid TOML: "):
        load_service_config(path, {})
    path.write_text('handlers = "fns"\nhandlers = "again"\n')
    with pytest.raises(ConfigError, match=rf"^{path}:2: invalid TOML: Cannot overwrite a value"):
        load_service_config(path, {})


# -- each error once ---------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_settings_error_is_logged_once_though_its_function_is_retried(
    handlers: Path, serve: Callable[..., Serve]
) -> None:
    write_handler(handlers, "bad", "# /// eventfn\n# timeout = \n# ///\n" + HANDLER)
    write_handler(handlers, "good", HANDLER)
    service = serve()
    service.log.wait_for(r"function bad: .*bad\.py:2: invalid TOML")
    mark = service.log.mark()
    # A new helper module changes every single-file function's version: `bad` is retried, still broken.
    (handlers / "helpers.py").write_text("X = 1\n")
    service.log.wait_for(r"function good reloaded", start=mark)
    (handlers / "bad.py").write_text('# /// eventfn\n# timeout = "3"\n# ///\n' + HANDLER)  # a new error is news
    service.log.wait_for(r"function bad: .*bad\.py: invalid setting: Expected `float`, got `str`", start=mark)
    errors = [line for line in service.log.lines if "function bad:" in line]
    assert len(errors) == 2, errors


# -- the start-up hint -------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_start_up_hint_names_a_function_that_exists(tmp_path: Path, handlers: Path) -> None:
    with Serve(handlers, None, tmp_path / "empty") as service:
        hint = service.log.wait_for(r"embedded NATS at .*").group(0)
    assert "add a handler file to" in hint and "eventfn.invoke.<name>" in hint and ".hello" not in hint

    write_handler(handlers, "greet", HANDLER)
    with Serve(handlers, None, tmp_path / "one") as service:
        hint = service.log.wait_for(r"embedded NATS at .*").group(0)
    assert "req eventfn.invoke.greet '{}'" in hint and "hello" not in hint
