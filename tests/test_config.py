"""Function settings (inline block, sidecar, service overrides), trigger validation and the service config."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from eventfn.config import (
    ConfigError,
    FunctionSettings,
    RetryPolicy,
    Trigger,
    environment_overrides,
    inline_settings_text,
    load_service_config,
    read_function_settings,
)
from eventfn.sources import mappings


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def handler_file(tmp_path: Path, block: str | None, *, name: str = "fn", preamble: str = "") -> Path:
    """A handler file with an optional `# /// eventfn` block holding `block` (plain TOML, commented here)."""
    lines = [line for line in textwrap.dedent(preamble).splitlines() if line] if preamble else []
    if block is not None:
        lines.append("# /// eventfn")
        lines += [f"# {line}" if line else "#" for line in textwrap.dedent(block).strip("\n").splitlines()]
        lines.append("# ///")
    lines += ["", "def handler(event, context):", "    return event", ""]
    path = tmp_path / f"{name}.py"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# -- reading and merging ---------------------------------------------------------------------------------------


def test_file_without_settings_gets_lambda_defaults(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, None)
    settings = read_function_settings("fn", entry, tmp_path / "fn.toml", {})
    assert settings == FunctionSettings()
    assert settings.timeout == 3.0
    assert settings.memory == 128
    assert settings.retry == RetryPolicy(max_attempts=2)
    assert settings.triggers == []


def test_inline_block_is_read(tmp_path: Path) -> None:
    entry = handler_file(
        tmp_path,
        """
        description = "inline"
        timeout = 7
        memory = 256
        triggers = ["events.orders.*"]
        [environment]
        GREETING = "hi"
        [retry]
        max_attempts = 5
    """,
        preamble='"""Docstring first."""\nimport os\n',
    )
    settings = read_function_settings("fn", entry, None, {})
    assert settings.description == "inline"
    assert settings.timeout == 7
    assert settings.memory == 256
    assert settings.environment == {"GREETING": "hi"}
    assert settings.retry.max_attempts == 5
    assert settings.trigger_list() == [Trigger(subjects=["events.orders.*"])]


def test_inline_block_with_other_block_type_is_ignored(tmp_path: Path) -> None:
    entry = tmp_path / "fn.py"
    entry.write_text("# /// script\n# timeout = 9\n# ///\ndef handler(e, c):\n    return e\n", encoding="utf-8")
    assert read_function_settings("fn", entry, None, {}).timeout == 3.0


def test_inline_settings_text_reports_the_line_the_block_starts_on() -> None:
    source = "import os\n\n# /// eventfn\n# timeout = 4\n#\n# memory = 512\n# ///\n"
    found = inline_settings_text(source)
    assert found is not None
    text, start = found
    assert start == 3
    assert text.splitlines() == ["timeout = 4", "", "memory = 512"]


def test_sidecar_wins_over_inline_block_key_by_key(tmp_path: Path) -> None:
    entry = handler_file(
        tmp_path,
        """
        description = "inline"
        timeout = 7
        memory = 256
    """,
    )
    sidecar = write(
        tmp_path / "fn.toml",
        """
        timeout = 11
    """,
    )
    settings = read_function_settings("fn", entry, sidecar, {})
    assert settings.timeout == 11  # from the sidecar
    assert settings.memory == 256  # kept from the inline block
    assert settings.description == "inline"


def test_service_overrides_win_over_sidecar_and_inline_block_key_by_key(tmp_path: Path) -> None:
    entry = handler_file(
        tmp_path,
        """
        description = "inline"
        timeout = 7
        memory = 256
    """,
    )
    sidecar = write(
        tmp_path / "fn.toml",
        """
        timeout = 11
        concurrency = 4
    """,
    )
    settings = read_function_settings("fn", entry, sidecar, {"timeout": 20, "memory": 1024})
    assert settings.timeout == 20
    assert settings.memory == 1024
    assert settings.concurrency == 4
    assert settings.description == "inline"


def test_missing_sidecar_is_not_an_error(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, "timeout = 5")
    assert read_function_settings("fn", entry, tmp_path / "fn.toml", {}).timeout == 5


def test_trigger_table_form_with_name(tmp_path: Path) -> None:
    entry = handler_file(
        tmp_path,
        """
        triggers = ["events.a", {subjects = ["events.b.*", "events.c.>"], name = "bc"}]
    """,
    )
    settings = read_function_settings("fn", entry, None, {})
    assert settings.trigger_list() == [
        Trigger(subjects=["events.a"]),
        Trigger(subjects=["events.b.*", "events.c.>"], name="bc"),
    ]


# -- errors name the key and the file ------------------------------------------------------------------------


def test_unknown_key_in_inline_block_names_key_and_handler_file(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, "timout = 5")
    with pytest.raises(ConfigError) as info:
        read_function_settings("fn", entry, None, {})
    assert "timout" in str(info.value)
    assert info.value.where == str(entry)
    assert str(info.value).startswith(str(entry))


def test_unknown_nested_key_names_key(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, "[retry]\nmax_attempt = 5")
    with pytest.raises(ConfigError) as info:
        read_function_settings("fn", entry, None, {})
    assert "max_attempt" in str(info.value)
    assert str(entry) in str(info.value)


def test_unknown_key_in_sidecar_names_key_and_sidecar(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, None)
    sidecar = write(tmp_path / "fn.toml", "memroy = 256\n")
    with pytest.raises(ConfigError) as info:
        read_function_settings("fn", entry, sidecar, {})
    assert "memroy" in str(info.value)
    assert info.value.where == str(sidecar)


def test_unknown_key_in_service_override_names_key_and_functions_table(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, None)
    with pytest.raises(ConfigError) as info:
        read_function_settings("fn", entry, None, {"concurency": 3})
    assert "concurency" in str(info.value)
    assert info.value.where == "eventfn.toml [functions.fn]"


def test_unknown_key_in_inline_block_names_handler_file_even_when_sidecar_exists(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, "timout = 5")
    sidecar = write(tmp_path / "fn.toml", "memory = 256\n")
    with pytest.raises(ConfigError) as info:
        read_function_settings("fn", entry, sidecar, {})
    assert "timout" in str(info.value)
    assert info.value.where == str(entry)


def test_out_of_range_value_is_config_error(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, "timeout = 901")
    with pytest.raises(ConfigError, match="timeout"):
        read_function_settings("fn", entry, None, {})


def test_wrong_type_is_config_error(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, 'memory = "lots"')
    with pytest.raises(ConfigError, match="memory"):
        read_function_settings("fn", entry, None, {})


def test_invalid_toml_in_inline_block_points_at_the_handler_file_line(tmp_path: Path) -> None:
    # Line 1-3: preamble; 4: `# /// eventfn`; 5: timeout; 6: the broken line.
    entry = handler_file(
        tmp_path,
        """
        timeout = 5
        memory = = 256
    """,
        preamble='"""Doc."""\nimport os\nimport sys\n',
    )
    assert entry.read_text().splitlines()[5] == "# memory = = 256"
    with pytest.raises(ConfigError) as info:
        read_function_settings("fn", entry, None, {})
    assert info.value.where == f"{entry}:6"
    assert "invalid TOML" in str(info.value)


def test_invalid_toml_in_sidecar_points_at_the_sidecar_line(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, None)
    sidecar = write(
        tmp_path / "fn.toml",
        """
        timeout = 5

        memory = = 256
        concurrency = 2
    """,
    )
    with pytest.raises(ConfigError) as info:
        read_function_settings("fn", entry, sidecar, {})
    assert info.value.where == f"{sidecar}:3"


def test_invalid_environment_variable_name_is_rejected(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, '[environment]\n"A=B" = "x"')
    with pytest.raises(ConfigError, match="A=B"):
        read_function_settings("fn", entry, None, {})


# -- triggers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        "events..orders",  # empty token
        ".events",
        "events.",
        "",
        "events.>.orders",  # `>` not last
        "events.or>ders",
        "events.ord*",
        "events.or ders",
    ],
)
def test_invalid_trigger_subject_is_rejected(tmp_path: Path, subject: str) -> None:
    entry = handler_file(tmp_path, None)
    with pytest.raises(ConfigError, match="not a valid NATS subject"):
        read_function_settings("fn", entry, None, {"triggers": [subject]})


@pytest.mark.parametrize(
    ("subject", "reserved"),
    [
        ("eventfn.invoke.fn", "eventfn.>"),
        ("eventfn.>", "eventfn.>"),
        ("*.invoke.fn", "eventfn.>"),
        (">", "eventfn.>"),
        ("_INBOX.abc", "_INBOX.>"),
        ("_INBOX.*", "_INBOX.>"),
        ("$JS.API.>", "$JS.>"),
    ],
)
def test_trigger_overlapping_reserved_subjects_is_rejected(tmp_path: Path, subject: str, reserved: str) -> None:
    entry = handler_file(tmp_path, None)
    with pytest.raises(ConfigError) as info:
        read_function_settings("fn", entry, None, {"triggers": [subject]})
    assert f"overlaps {reserved!r}" in str(info.value)


@pytest.mark.parametrize(
    "subjects",
    [
        ["events.orders.*", "events.orders.new"],
        ["events.>", "events.orders"],
        ["events.*.eu", "events.orders.*"],
        ["events.a", "events.a"],
    ],
)
def test_overlapping_subjects_inside_one_trigger_are_rejected(tmp_path: Path, subjects: list[str]) -> None:
    entry = handler_file(tmp_path, None)
    with pytest.raises(ConfigError, match="overlap"):
        read_function_settings("fn", entry, None, {"triggers": [{"subjects": subjects}]})


def test_disjoint_subjects_inside_one_trigger_are_accepted(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, None)
    subjects = ["events.orders.*", "events.orders.new.eu", "events.payments.>", "events.orders"]
    settings = read_function_settings("fn", entry, None, {"triggers": [{"subjects": subjects}]})
    assert settings.trigger_list() == [Trigger(subjects=subjects)]


def test_trigger_without_subjects_is_rejected(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, None)
    with pytest.raises(ConfigError, match="at least one subject"):
        read_function_settings("fn", entry, None, {"triggers": [{"subjects": []}]})


def test_trigger_with_invalid_name_is_rejected(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, None)
    with pytest.raises(ConfigError, match="trigger name"):
        read_function_settings("fn", entry, None, {"triggers": [{"subjects": ["events.a"], "name": "a b"}]})


def test_invalid_trigger_in_sidecar_names_the_sidecar(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, None)
    sidecar = write(tmp_path / "fn.toml", 'triggers = ["events..x"]\n')
    with pytest.raises(ConfigError) as info:
        read_function_settings("fn", entry, sidecar, {})
    assert info.value.where == str(sidecar)


# -- the service config ----------------------------------------------------------------------------------------


def test_environment_overrides_reads_eventfn_variables() -> None:
    env = {
        "EVENTFN_NATS_URL": "nats://a:4222,,nats://b:4222,",
        "EVENTFN_HANDLERS": "fns",
        "EVENTFN_DATA_DIR": "/var/lib/eventfn",
        "EVENTFN_LOG_LEVEL": "DEBUG",
        "EVENTFN_NATS_CREDS": "/etc/nats.creds",
        "EVENTFN_NATS_TOKEN": "s3cret",
        "EVENTFN_NATS_PORT": "4333",
        "HOME": "/root",
        "NATS_URL": "nats://ignored:4222",
    }
    assert environment_overrides(env) == {
        "nats.url": ["nats://a:4222", "nats://b:4222"],
        "handlers": "fns",
        "data_dir": "/var/lib/eventfn",
        "log_level": "DEBUG",
        "nats.creds": "/etc/nats.creds",
        "nats.token": "s3cret",
        "nats.port": 4333,
    }


def test_environment_overrides_skips_empty_variables() -> None:
    assert environment_overrides({"EVENTFN_HANDLERS": "", "EVENTFN_NATS_URL": ""}) == {}


def test_service_config_defaults_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_service_config(None, {})
    assert config.handlers == "handlers"
    assert config.nats.url == []
    assert config.nats.port == 4222
    assert config.stream.subjects == ["events.>"]


def test_service_config_reads_default_file_in_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "eventfn.toml", 'handlers = "lambdas"\n')
    monkeypatch.chdir(tmp_path)
    assert load_service_config(None, {}).handlers == "lambdas"


def test_service_config_explicit_path_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="file not found") as info:
        load_service_config(missing, {})
    assert info.value.where == str(missing)


def test_service_config_file_values_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path / "eventfn.toml",
        """
        handlers = "lambdas"
        log_level = "WARNING"
        [nats]
        url = "nats://a:4222,nats://b:4222"
        user = "me"
        [stream]
        subjects = ["events.>", "orders.>"]
        [functions.hello]
        timeout = 9
    """,
    )
    config = load_service_config(path, {})
    assert config.handlers == "lambdas"
    assert config.log_level == "WARNING"
    assert config.nats.url == ["nats://a:4222", "nats://b:4222"]
    assert config.nats.user == "me"
    assert config.stream.subjects == ["events.>", "orders.>"]
    assert config.functions == {"hello": {"timeout": 9}}


def test_overrides_win_over_file_and_keep_other_nats_settings(tmp_path: Path) -> None:
    path = write(
        tmp_path / "eventfn.toml",
        """
        handlers = "lambdas"
        data_dir = "state"
        [nats]
        url = ["nats://file:4222"]
        user = "me"
        port = 4000
    """,
    )
    overrides = environment_overrides({"EVENTFN_NATS_URL": "nats://env:4222", "EVENTFN_HANDLERS": "from-env"})
    config = load_service_config(path, overrides)
    assert config.handlers == "from-env"
    assert config.data_dir == "state"
    assert config.nats.url == ["nats://env:4222"]
    assert config.nats.user == "me"
    assert config.nats.port == 4000


def test_flags_applied_after_environment_win(tmp_path: Path) -> None:
    # How the CLI builds its overrides: environment first, then the flags that were given.
    path = write(tmp_path / "eventfn.toml", 'handlers = "from-file"\n')
    overrides = environment_overrides({"EVENTFN_HANDLERS": "from-env", "EVENTFN_NATS_PORT": "4100"})
    overrides.update({"handlers": "from-flag"})
    config = load_service_config(path, overrides)
    assert config.handlers == "from-flag"
    assert config.nats.port == 4100


def test_none_override_keeps_file_value(tmp_path: Path) -> None:
    path = write(tmp_path / "eventfn.toml", 'handlers = "from-file"\n[nats]\nport = 4001\n')
    config = load_service_config(path, {"handlers": None, "nats.port": None})
    assert config.handlers == "from-file"
    assert config.nats.port == 4001


def test_unknown_key_in_service_file_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path / "eventfn.toml", '[nats]\nurls = ["nats://x:4222"]\n')
    with pytest.raises(ConfigError) as info:
        load_service_config(path, {})
    assert "urls" in str(info.value)
    assert info.value.where == str(path)


def test_invalid_toml_in_service_file_points_at_line(tmp_path: Path) -> None:
    path = write(tmp_path / "eventfn.toml", 'handlers = "ok"\ndata_dir = \n')
    with pytest.raises(ConfigError) as info:
        load_service_config(path, {})
    assert info.value.where == f"{path}:2"


def test_non_numeric_port_from_environment_is_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="port"):
        load_service_config(None, environment_overrides({"EVENTFN_NATS_PORT": "abc"}))


@pytest.mark.parametrize(
    ("trigger", "problem"),
    [
        ({"ordering": "key"}, "ordering = 'key' needs a key"),
        ({"ordering": "shard"}, "ordering = 'shard' needs a key"),
        ({"ordering": "key", "key": "body:x"}, "key 'body:x' is invalid: it starts with neither"),
        ({"ordering": "key", "key": "subject:x"}, "a subject token index is a number"),
        ({"ordering": "key", "key": "header:"}, "a header name is printable text"),
        ({"ordering": "sorted", "key": "header:K"}, "Invalid enum value 'sorted' - at `$.triggers[0].ordering`"),
        ({"starting_position": "AT_TIMESTAMP"}, "starting_position_timestamp goes with"),
        ({"starting_position_timestamp": 1.0}, "starting_position_timestamp goes with"),
    ],
)
def test_ordering_and_start_settings_are_checked_with_the_file_and_the_fix(
    tmp_path: Path, trigger: dict[str, object], problem: str
) -> None:
    entry = handler_file(tmp_path, None)
    with pytest.raises(ConfigError) as info:
        read_function_settings("fn", entry, None, {"triggers": [{"subjects": ["events.x"], **trigger}]})
    assert problem in str(info.value)
    assert str(entry) in str(info.value) or "eventfn.toml" in str(info.value)


def test_ordering_by_header_or_subject_token_is_accepted(tmp_path: Path) -> None:
    entry = handler_file(tmp_path, None)
    triggers = [
        {"subjects": ["orders.>"], "ordering": "key", "key": "header:Order-Id"},
        {"subjects": ["clicks.*"], "ordering": "shard", "key": "subject:1", "starting_position": "TRIM_HORIZON"},
    ]
    settings = read_function_settings("fn", entry, None, {"triggers": triggers})
    assert [(t.ordering, t.key) for t in settings.trigger_list()] == [
        ("key", "header:Order-Id"),
        ("shard", "subject:1"),
    ]


def test_recovery_timings_reach_the_mappings_ack_wait_pin_and_dlq_retry(tmp_path: Path) -> None:
    path = write(tmp_path / "eventfn.toml", "[recovery]\nredelivery_margin = 2\npin_timeout = 3\ndlq_retry_delay = 1\n")
    config = load_service_config(path, {})
    entry = handler_file(tmp_path, None)
    triggers = [{"subjects": ["orders.>"], "ordering": "key", "key": "header:Order-Id"}, {"subjects": ["x.>"]}]
    settings = read_function_settings("fn", entry, None, {"timeout": 1, "triggers": triggers})
    default, tuned = mappings.plan("fn", settings), mappings.plan("fn", settings, recovery=config.recovery)
    assert default["fn--t0"].ack_wait == 1 + 10 and default["fn--t0"].source.consumer.pin_timeout == 10
    assert tuned["fn--t0"].ack_wait == 1 + 2 and tuned["fn--t0"].source.consumer.pin_timeout == 3
    assert tuned["fn--t1"].ack_wait == 1 + 2 and not tuned["fn--t1"].source.consumer.exclusive
    assert (default["fn--t1"].dlq_retry_delay, tuned["fn--t1"].dlq_retry_delay) == (5, 1)


def test_a_lapse_shorter_than_two_heartbeats_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "eventfn.toml", "[recovery]\nheartbeat = 1\nlapse = 1.5\n")
    with pytest.raises(ConfigError, match=r"lapse \(1.5 s\) must be at least twice heartbeat \(1 s\)"):
        load_service_config(path, {})


def test_nats_restart_delays_are_a_bounded_list_of_waits(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.toml", "")
    assert load_service_config(empty, {}).recovery.nats_restart_delays == [0.0, 0.5, 1.0, 2.0, 4.0]
    path = write(tmp_path / "eventfn.toml", "[recovery]\nnats_restart_delays = [0, -1]\n")
    with pytest.raises(ConfigError, match="nats_restart_delays is a list of at most 100 waits of 0 to 600 seconds"):
        load_service_config(path, {})
