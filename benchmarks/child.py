"""The line protocol between the harness and a measured process (the ceiling, the peer, a load generator).

The child prints `ready` once it is subscribed, runs until its stdin closes (or it finishes its own work),
then prints one `result <json>` line. Each measured process gets its own interpreter and event loop, as
`eventfn serve` has, so no two of them share a GIL with each other or with the harness.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

# -- the child's side -------------------------------------------------------------------------------------


async def ready() -> None:
    """Tell the harness the child is subscribed and waiting."""
    sys.stdout.write("ready\n")
    sys.stdout.flush()


async def until_stopped() -> None:
    """Return when the harness closes our stdin."""
    await asyncio.to_thread(sys.stdin.read)


def mark(word: str) -> None:
    """Tell the harness a phase begins or ends (it waits for the word with `Child.expect`)."""
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


def result(value: dict[str, Any]) -> None:
    """Hand the harness what was measured."""
    sys.stdout.write("result " + json.dumps(value) + "\n")
    sys.stdout.flush()


# -- the harness's side -----------------------------------------------------------------------------------


class Child:
    """A measured process started with `python -m <module> <args>`; its stderr goes to `log`."""

    def __init__(self, module: str, args: list[str], log: Path) -> None:
        self.argv = [sys.executable, "-m", module, *args]
        self.log = log
        self.process: anyio.abc.Process | None = None
        self._reader: BufferedByteReceiveStream | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, *, timeout: float = 30.0) -> Child:
        """Start the child and wait for its `ready` line."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as err:
            self.process = await anyio.open_process(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=Path(__file__).parent.parent
            )
        assert self.process.stdout is not None
        self._reader = BufferedByteReceiveStream(self.process.stdout)
        with anyio.fail_after(timeout):
            line = await self._line()
        if line != "ready":
            raise RuntimeError(f"{' '.join(self.argv)}: expected 'ready', got {line!r}; see {self.log}")
        return self

    async def _line(self) -> str:
        assert self._reader is not None
        try:
            raw = await self._reader.receive_until(b"\n", 64 * 1024 * 1024)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(self.argv)} exited early; its stderr ends:\n{tail}") from None
        return raw.decode()

    async def expect(self, word: str, *, timeout: float = 60.0) -> None:
        """Wait for the child's next line, which must be `word` (see `mark`)."""
        with anyio.fail_after(timeout):
            line = await self._line()
        if line != word:
            raise RuntimeError(f"{' '.join(self.argv)}: expected {word!r}, got {line[:200]!r}; see {self.log}")

    async def finish(self, *, timeout: float = 60.0) -> dict[str, Any]:
        """Close the child's stdin (which stops a consumer; a load generator ends by itself), then return
        the result it prints and wait for it to exit."""
        assert self.process is not None and self.process.stdin is not None
        await self.process.stdin.aclose()
        with anyio.fail_after(timeout):
            line = await self._line()
            await self.process.wait()
        if not line.startswith("result "):
            raise RuntimeError(f"{' '.join(self.argv)}: expected a result, got {line[:200]!r}")
        value: dict[str, Any] = json.loads(line.removeprefix("result "))
        return value

    async def kill(self) -> None:
        """Stop the child at once (cleanup after a failure)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            with anyio.CancelScope(shield=True):
                await self.process.wait()
