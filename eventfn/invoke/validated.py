"""The versions that loaded in an earlier run of the service, so that a restart need not import them again.

A function scaled to zero keeps no worker, so validating its version at start-up is the one reason to import its
handler then: a worker forked, confined, the module imported, the worker stopped, about 10 ms of CPU each, which
for 1,000 functions is most of a restart. A version (Lambda's CodeSha256 of its code and settings) that loaded
before, under the same interpreter and eventfn, loads again, short of a change outside the handler directory (a
package removed from site-packages): that shows at its first cold start, with Lambda's init error, as it would on
Lambda. Only the first load of a function in a service's life is taken from here; a hot reload always validates.

Kept in `<data_dir>/validated.json`, written whole (temporary file and rename) after each reload that changed it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import msgspec

import eventfn

log = logging.getLogger(__name__)

#: What else a version's loading depends on: the interpreter and eventfn's own runtime.
RUNTIME = f"{sys.version} {sys.executable} eventfn {eventfn.__version__}"


class _Entry(msgspec.Struct, frozen=True, array_like=True):
    version: str
    init_ms: float


class _File(msgspec.Struct):
    runtime: str = ""
    functions: dict[str, _Entry] = {}


class Validated:
    """Versions that loaded, by function name, as this service and earlier runs of it found them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, _Entry] = {}
        self._dirty = False
        try:
            data = msgspec.json.decode(path.read_bytes(), type=_File)
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("%s unreadable (%s): every function is validated at start-up", path, exc)
            return
        if data.runtime == RUNTIME:
            self._entries = dict(data.functions)

    def init_ms(self, function: str, version: str) -> float | None:
        """The Init Duration `version` of `function` loaded with last time, if it loaded; else None."""
        entry = self._entries.get(function)
        return entry.init_ms if entry is not None and entry.version == version else None

    def loaded(self, function: str, version: str, init_ms: float) -> None:
        if self._entries.get(function) != (entry := _Entry(version, round(init_ms, 2))):
            self._entries[function] = entry
            self._dirty = True

    def failed(self, function: str) -> None:
        """The function's latest version did not load: none of its versions is taken as valid any more."""
        if self._entries.pop(function, None) is not None:
            self._dirty = True

    def keep_only(self, functions: set[str]) -> None:
        """Forget the functions that are gone."""
        for name in [n for n in self._entries if n not in functions]:
            del self._entries[name]
            self._dirty = True

    def save(self) -> None:
        """Write the record if it changed (never raises: it only saves work at the next start)."""
        if not self._dirty:
            return
        staged = self.path.with_name(self.path.name + ".tmp")
        try:
            staged.write_bytes(msgspec.json.encode(_File(RUNTIME, self._entries)))
            os.replace(staged, self.path)
        except OSError as exc:
            log.warning("cannot write %s (%s): the next start validates every function again", self.path, exc)
            return
        self._dirty = False
