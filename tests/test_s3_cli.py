"""The aws CLI against the S3 API, as a user types it: `aws s3 cp` of a file over the CLI's 8 MB multipart
threshold up and down, `aws s3 ls`, `aws s3 rm` (one key, and `--recursive`), `aws s3 mb`."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3_rig import AWS, Rig, running

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with running(tmp_path_factory.mktemp("s3cli"), {}, buckets=("files",)) as found:
        yield found


def aws(rig: Rig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AWS, "--endpoint-url", rig.url, *args], capture_output=True, text=True, env=rig.aws_env(), timeout=120
    )


def test_aws_s3_cp_ls_rm(rig: Rig, tmp_path: Path) -> None:
    data = os.urandom(9 * 1024 * 1024 + 12345)  # over 8 MB: the CLI uploads it in parts
    source = tmp_path / "nine.bin"
    source.write_bytes(data)
    up = aws(rig, "s3", "cp", str(source), "s3://files/backups/nine.bin", "--no-progress")
    assert up.returncode == 0, up.stderr
    stored = rig.root / "files" / "backups" / "nine.bin"
    assert stored.read_bytes() == data
    head = rig.client().head_object(Bucket="files", Key="backups/nine.bin")
    assert head["ETag"].endswith('-2"'), "uploaded in two parts (8 MB and the rest)"
    down = aws(rig, "s3", "cp", "s3://files/backups/nine.bin", str(tmp_path / "back.bin"), "--no-progress")
    assert down.returncode == 0, down.stderr
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).digest() == hashlib.sha256(data).digest()

    (rig.root / "files" / "notes.txt").write_text("a file put there by hand is listed too")
    top = aws(rig, "s3", "ls", "s3://files/")
    assert top.returncode == 0, top.stderr
    lines = top.stdout.splitlines()
    assert any(line.split() == ["PRE", "backups/"] for line in lines), lines
    assert any(line.split()[-2:] == ["38", "notes.txt"] for line in lines), lines
    everything = aws(rig, "s3", "ls", "s3://files/", "--recursive")
    assert [line.split()[-1] for line in everything.stdout.splitlines()] == ["backups/nine.bin", "notes.txt"]
    assert [line.split()[-2] for line in everything.stdout.splitlines()] == [str(len(data)), "38"]
    buckets = aws(rig, "s3", "ls")
    assert "files" in [line.split()[-1] for line in buckets.stdout.splitlines()]

    removed = aws(rig, "s3", "rm", "s3://files/notes.txt")
    assert removed.returncode == 0 and not (rig.root / "files" / "notes.txt").exists(), removed.stderr
    aws(rig, "s3", "cp", str(source), "s3://files/backups/copy.bin", "--no-progress")
    emptied = aws(rig, "s3", "rm", "s3://files/", "--recursive")
    assert emptied.returncode == 0, emptied.stderr
    assert sorted(line.split()[-1] for line in emptied.stdout.splitlines()) == [
        "s3://files/backups/copy.bin",
        "s3://files/backups/nine.bin",
    ]
    assert list((rig.root / "files").iterdir()) == []

    made = aws(rig, "s3", "mb", "s3://made-by-cli")
    assert made.returncode == 0 and (rig.root / "made-by-cli").is_dir(), made.stderr
    missing = aws(rig, "s3", "ls", "s3://no-such-bucket/")
    assert missing.returncode != 0 and "NoSuchBucket" in missing.stderr
