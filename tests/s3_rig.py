"""What the S3 API's tests share: one `eventfn serve` (on its own nats-server) per test module with a buckets root
and the test access keys, boto3 and the aws CLI pointed at it, and raw HTTP for what no client sends."""

from __future__ import annotations

import http.client
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config

from eventfn.testing import PROBE_MODULE, NatsServer, Serve, write_handler

ACCESS_KEY = "AKIAEVENTFNTEST00001"
SECRET_KEY = "eventfn-test-secret-key"
REGION = "us-east-1"
AWS = str(Path(sys.executable).parent / "aws")


@dataclass
class Rig:
    """A running service: its HTTP URL, its buckets root, its NATS URL, and the process (for its log)."""

    url: str
    root: Path
    nats_url: str
    service: Serve
    #: The clients made, closed with the rig (their pooled sockets, not left to garbage collection).
    clients: list[Any] = field(default_factory=list)

    def client(self, **config: Any) -> Any:
        """boto3's S3 client as a user makes it, with the endpoint URL; no retries (a retry would hide a 5xx).
        `config`: more of botocore's `Config` (`signature_version`, say)."""
        made = self._client(**config)
        self.clients.append(made)
        return made

    def _client(self, **config: Any) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(retries={"total_max_attempts": 1}, **config),
        )

    def aws_env(self) -> dict[str, str]:
        """The aws CLI's environment: the test keys and nothing of the machine's own configuration."""
        return {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.root.parent),
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_MAX_ATTEMPTS": "1",
        }

    def raw(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request as sent, unsigned (the service listens on loopback, where no credentials are required)."""
        where = urlsplit(self.url)
        conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=30)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                conn.putheader(name, value)
            conn.endheaders(body or None)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()


def config(directory: Path, root: Path, extra: str = "") -> Path:
    toml = directory / "eventfn.toml"
    toml.write_text(
        f'[buckets]\nroot = "{root}"\n\n[http.access_keys]\n{ACCESS_KEY} = "{SECRET_KEY}"\n{extra}', encoding="utf-8"
    )
    return toml


@contextmanager
def running(directory: Path, handlers: dict[str, str], *, buckets: tuple[str, ...] = ()) -> Iterator[Rig]:
    """`eventfn serve` with `handlers` (name -> source) and the folders `buckets` made under its root."""
    root = directory / "buckets"
    for bucket in buckets:
        (root / bucket).mkdir(parents=True, exist_ok=True)
    folder = directory / "handlers"
    folder.mkdir()
    (folder / "_probe.py").write_text(PROBE_MODULE)
    for name, source in handlers.items():
        write_handler(folder, name, source)
    with NatsServer(directory / "nats") as nats:
        toml = config(directory, root)
        with Serve(
            folder, nats.url, directory / "data", extra_args=["--config", str(toml)], env={"PROBE_NATS": nats.url}
        ) as service:
            rig = Rig(service.http_url, root, nats.url, service)
            try:
                yield rig
            finally:
                for client in rig.clients:
                    client.close()
