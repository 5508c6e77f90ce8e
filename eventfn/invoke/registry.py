"""Handler discovery and hot reload: which functions the handler directory holds, and when they change.

Discovery never executes user code. It reads files, parses them with `ast` only to see whether a module
defines an entry point, and reads settings from TOML. What a function *is* for reload purposes is the hash
of its code and settings (Lambda's CodeSha256): a change to either makes a new version.

- `handlers/<name>.py` is function `<name>` when it defines `handler`/`lambda_handler`, carries a
  `# /// eventfn` block, or has a `<name>.toml` beside it. Other modules (and any starting with `_`) are
  shared helpers that functions may import; a change to one reloads the single-file functions.
- `handlers/<name>/` is a folder function with its own modules: its entry module is the one named by the
  `handler = "module.function"` setting, else the first of `lambda_function.py`, `handler.py`, `app.py`,
  `main.py`; settings come from that module's block and `handlers/<name>/eventfn.toml`.
- A file or folder that would be a function but whose name cannot be one (a dot, a space, a leading `-`,
  non-ASCII, too long: see `config.name_problem`) is *invalid*: reported with the reason, never loaded, and
  not a helper either, so a change to it reloads nothing.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import msgspec
from watchfiles import Change, DefaultFilter, awatch

from eventfn.config import FunctionSettings, inline_settings_text, name_problem, read_function_settings
from eventfn.errors import ConfigError
from eventfn.invoke.handler import ENTRY_NAMES
from eventfn.invoke.protocol import WorkerSpec

log = logging.getLogger(__name__)

FOLDER_ENTRY_MODULES = ("lambda_function", "handler", "app", "main")


class FunctionSource(msgspec.Struct, frozen=True, kw_only=True):
    """Where one function's code lives and what its settings say (or why they could not be read)."""

    name: str
    task_root: str
    module: str
    entry_file: str
    attribute: str | None
    version: str
    settings: FunctionSettings | None
    error: str | None = None
    #: The file:line the error points at, where known.
    error_file: str | None = None
    #: A folder function (`handlers/<name>/`, its code the folder's files); else a single file in the handler
    #: directory (its code that file, and the module its `handler` setting names).
    folder: bool = False

    def handler(self) -> str:
        """Lambda's `Handler` (`_HANDLER`): `<module>.<function>`, the function the configured one or, without one,
        the entry point the module defines (`handler` or `lambda_handler`). Reads the entry file: not per event."""
        if self.attribute:
            return f"{self.module}.{self.attribute}"
        names = _files.entry_names(Path(self.entry_file)) or set()
        return f"{self.module}.{next((n for n in ENTRY_NAMES if n in names), ENTRY_NAMES[0])}"

    def worker_spec(self, settings: FunctionSettings) -> WorkerSpec:
        """What a pool (either kind) needs to load this source's code under `settings`."""
        return WorkerSpec(
            function=self.name,
            task_root=self.task_root,
            module=self.module,
            entry_file=self.entry_file,
            attribute=self.attribute,
            memory=settings.memory,
            timeout=settings.timeout,
            max_log_bytes=settings.max_log_bytes,
        )


def _defines_entry(source: str) -> bool | None:
    """Whether a module defines `handler`/`lambda_handler` at top level; None if it does not parse."""
    names = _entry_names(source)
    return None if names is None else bool(names)


def entry_name(source: str) -> str:
    """The entry point a module without a configured one runs: `handler` if it defines it, else `lambda_handler`
    (what the runtime's loader takes, in its order); `handler` where it defines neither or does not parse."""
    names = _entry_names(source) or set()
    return next((name for name in ENTRY_NAMES if name in names), ENTRY_NAMES[0])


def _entry_names(source: str) -> set[str] | None:
    """Which of `handler`/`lambda_handler` a module defines at top level; None if it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in ENTRY_NAMES:
            found.add(node.name)
        elif isinstance(node, ast.Assign):
            found.update(t.id for t in node.targets if isinstance(t, ast.Name) and t.id in ENTRY_NAMES)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            found.update(n for alias in node.names if (n := alias.asname or alias.name) in ENTRY_NAMES)
    return found


class _Stamp(NamedTuple):
    """What changes when a file is written, replaced or removed (`None` stands for a missing file)."""

    mtime_ns: int
    ctime_ns: int
    size: int
    inode: int


#: A file last changed at least this many seconds ago is taken as unchanged while its `_Stamp` stays: one written
#: twice within the file system's timestamp granularity (a few ms) could keep its stamp, a settled one cannot.
_SETTLED_NS = 2_000_000_000


class _Seen:
    __slots__ = ("data", "names", "scan", "stamp")

    def __init__(self, stamp: _Stamp, data: bytes, scan: int) -> None:
        self.stamp = stamp
        self.data = data
        self.scan = scan
        self.names: set[str] | bool | None = False  # False: not parsed yet


class _Files:
    """The handler files as the scans read them, each read and parsed once while it stays unchanged: a thousand
    functions' directory is read once at start-up, and a reload reads only what changed."""

    def __init__(self) -> None:
        self._seen: dict[Path, _Seen] = {}
        #: Bumped by every scan: what a scan read stays valid until it ends, settled or not.
        self.scan = 0
        self._scan_started_ns = 0
        #: Each file's stamp as this scan first found it (one stat per file and scan).
        self._stamps: dict[Path, _Stamp | None] = {}

    def begin(self) -> None:
        """A new scan starts: files changed lately are read again."""
        self.scan += 1
        self._scan_started_ns = time.time_ns()
        self._stamps = {}

    def end(self) -> None:
        """The scan is over: what it did not look at (removed files, another directory's) is forgotten."""
        self._seen = {path: seen for path, seen in self._seen.items() if path in self._stamps}

    def stamp(self, path: Path) -> _Stamp | None:
        """The file's stamp (None: missing), as first found by this scan: taken before the file is read, so a
        change after it makes the next scan read the file again."""
        if path in self._stamps:
            return self._stamps[path]
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            stamp = None
        else:
            stamp = _Stamp(st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        self._stamps[path] = stamp
        return stamp

    def settled(self, stamp: _Stamp | None) -> bool:
        """Whether a file with `stamp` can be trusted unchanged while its stamp stays (missing ones always can)."""
        if stamp is None:
            return True
        return max(stamp.mtime_ns, stamp.ctime_ns) < self._scan_started_ns - _SETTLED_NS

    def _entry(self, path: Path) -> _Seen | None:
        stamp = self.stamp(path)
        if stamp is None:
            self._seen.pop(path, None)
            return None
        seen = self._seen.get(path)
        if seen is not None and seen.stamp == stamp and (seen.scan == self.scan or self.settled(stamp)):
            return seen
        try:
            data = path.read_bytes()
        except OSError:
            return None
        seen = self._seen[path] = _Seen(stamp, data, self.scan)
        return seen

    def read(self, path: Path) -> bytes | None:
        """The file's bytes; None if it cannot be read."""
        seen = self._entry(path)
        return None if seen is None else seen.data

    def text(self, path: Path) -> str:
        """The file as text; empty if it cannot be read or is not UTF-8."""
        try:
            return (self.read(path) or b"").decode("utf-8")
        except UnicodeDecodeError:
            return ""

    def entry_names(self, path: Path) -> set[str] | None:
        """`_entry_names` of the file (None: it does not parse)."""
        seen = self._entry(path)
        if seen is None:
            return _entry_names("")
        if seen.names is False:
            try:
                seen.names = _entry_names(seen.data.decode("utf-8"))
            except UnicodeDecodeError:
                seen.names = set()  # read as empty, as `text` does
        assert not isinstance(seen.names, bool)
        return seen.names


_files = _Files()


def _read(path: Path) -> str:
    return _files.text(path)


def _digest(paths: list[Path], extra: bytes) -> str:
    h = hashlib.sha256(extra)
    for path in sorted(paths):
        h.update(str(path).encode())
        if (data := _files.read(path)) is not None:
            h.update(data)
    return h.hexdigest()[:12]


def _looks_like_function(path: Path) -> bool:
    """Whether a top-level module is meant as a function (whatever its name)."""
    source = _read(path)
    names = _files.entry_names(path)
    entry = None if names is None else bool(names)
    try:
        has_block = inline_settings_text(source) is not None
    except ConfigError:
        has_block = True  # a malformed block still marks a function: its error is shown, not ignored
    return entry is None or entry or has_block or path.with_suffix(".toml").exists()


def _is_folder_function(path: Path) -> bool:
    return (path / "eventfn.toml").exists() or any((path / f"{m}.py").exists() for m in FOLDER_ENTRY_MODULES)


class Discovery(msgspec.Struct, frozen=True, kw_only=True):
    """What the handler directory holds: functions by name, and entries that cannot be functions."""

    functions: dict[str, FunctionSource]
    #: File or folder name (`my func.py`, `bad.name/`) -> why it is not loaded and what to do.
    invalid: dict[str, str]


def scan(handlers_dir: Path, overrides: dict[str, dict[str, Any]] | None = None) -> Discovery:
    """Every function in `handlers_dir`, and every entry refused for its name. Never raises for a broken
    function: it carries its error."""
    overrides = overrides or {}
    found: dict[str, FunctionSource] = {}
    invalid: dict[str, str] = {}
    _files.begin()
    if not handlers_dir.is_dir():
        return Discovery(functions=found, invalid=invalid)
    root = handlers_dir.resolve()
    files: list[Path] = []
    helpers: list[Path] = []
    for path in sorted(root.iterdir()):
        if path.name.startswith((".", "_")):
            if path.suffix == ".py" and path.is_file():
                helpers.append(path)
            continue
        if path.is_dir():
            if problem := name_problem(path.name):
                if _is_folder_function(path):
                    invalid[path.name + "/"] = _refused(path.name, problem, "rename the folder")
            elif source := _folder(path, overrides.get(path.name, {})):
                found[path.name] = source
            continue
        if path.suffix != ".py" or not path.is_file():
            continue
        problem = name_problem(path.stem)
        if problem is None:
            (files if _looks_like_function(path) else helpers).append(path)
        elif path.stem.isidentifier() and not _looks_like_function(path):
            helpers.append(path)  # an importable helper module (a long or non-ASCII name is fine for that)
        else:
            invalid[path.name] = _refused(path.stem, problem, "rename the file")
    for path in files:
        found[path.stem] = _single_file_cached(path, root, helpers, overrides.get(path.stem, {}))
    scanned = set(files)
    for gone in [p for p in _sources if p not in scanned]:
        del _sources[gone]
    _files.end()
    return Discovery(functions=dict(sorted(found.items())), invalid=invalid)


def discover(handlers_dir: Path, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, FunctionSource]:
    """Every function in `handlers_dir`, by name. Never raises for a broken function: it carries the error."""
    return scan(handlers_dir, overrides).functions


def _refused(name: str, problem: str, fix: str) -> str:
    return (
        f"{name!r} is not a valid function name: {problem} "
        f"({fix}: letters, digits, `_` and `-`, starting with a letter or digit, at most 64)"
    )


def _settings(
    name: str, entry: Path, sidecar: Path | None, override: dict[str, Any]
) -> tuple[FunctionSettings | None, str | None, str | None]:
    try:
        return read_function_settings(name, entry, sidecar, override), None, None
    except ConfigError as exc:
        return None, str(exc), exc.where


def _split_handler(value: str | None) -> tuple[str | None, str | None]:
    if not value:
        return None, None
    module, _, attribute = value.rpartition(".")
    return (module or None), attribute


#: A single-file function's source as last scanned, with the stamps of every file it was made of and its overrides.
_sources: dict[Path, tuple[tuple[_Stamp | None, ...], bytes, FunctionSource]] = {}


def _single_file_cached(path: Path, root: Path, helpers: list[Path], override: dict[str, Any]) -> FunctionSource:
    """`_single_file`, kept while none of the files it read changed (settled ones only)."""
    extra = msgspec.json.encode(override)
    cached = _sources.get(path)
    if cached is not None:
        stamps, was, source = cached
        files = [path, path.with_suffix(".toml"), Path(source.entry_file), *helpers]
        if was == extra and len(stamps) == len(files):
            now = tuple(_files.stamp(f) for f in files)
            if now == stamps and all(_files.settled(s) for s in now):
                return source
    source = _single_file(path, root, helpers, override)
    files = [path, path.with_suffix(".toml"), Path(source.entry_file), *helpers]
    _sources[path] = (tuple(_files.stamp(f) for f in files), extra, source)
    return source


def _single_file(path: Path, root: Path, helpers: list[Path], override: dict[str, Any]) -> FunctionSource:
    name = path.stem
    sidecar = path.with_suffix(".toml")
    settings, error, error_file = _settings(name, path, sidecar, override)
    module, attribute = _split_handler(settings.handler if settings else None)
    entry = path
    if module and module != name:
        entry = root / (module.replace(".", "/") + ".py")
        if not entry.exists() and error is None:
            error, error_file = f"{path}: handler module {module!r} not found at {entry}", str(path)
    files = [path, sidecar, entry, *helpers]
    return FunctionSource(
        name=name,
        task_root=str(root),
        module=module or name,
        entry_file=str(entry),
        attribute=attribute,
        version=_digest(files, msgspec.json.encode(override)),
        settings=settings,
        error=error,
        error_file=error_file,
    )


def _folder(path: Path, override: dict[str, Any]) -> FunctionSource | None:
    sidecar = path / "eventfn.toml"
    if not _is_folder_function(path):
        return None  # a plain data or package folder, not a function
    default_entry = next((path / f"{m}.py" for m in FOLDER_ENTRY_MODULES if (path / f"{m}.py").exists()), None)
    name = path.name
    probe = default_entry or sidecar
    settings, error, error_file = _settings(name, probe, sidecar, override)
    module, attribute = _split_handler(settings.handler if settings else None)
    if module:
        entry = path / (module.replace(".", "/") + ".py")
        if entry != probe and entry.exists():
            # The named entry module's own `# /// eventfn` block counts, not the default module's.
            settings, error, error_file = _settings(name, entry, sidecar, override)
    elif default_entry is not None:
        entry, module = default_entry, default_entry.stem
    else:
        entry, module = sidecar, ""
    if error is None and (entry == sidecar or not entry.exists()):
        wanted = f"{module}.py" if module else 'lambda_function.py (or set handler = "module.function")'
        error, error_file = f"{path}: entry module {wanted} not found", str(path)
    files = [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return FunctionSource(
        name=name,
        task_root=str(path.resolve()),
        module=module,
        entry_file=str(entry.resolve()),
        attribute=attribute,
        version=_digest(files, msgspec.json.encode(override)),
        settings=settings,
        error=error,
        error_file=error_file,
        folder=True,
    )


class _HandlerFilter(DefaultFilter):
    """watchfiles' default filter (VCS dirs, __pycache__, editor swap files) plus compiled files."""

    def __call__(self, change: Change, path: str) -> bool:
        return super().__call__(change, path) and not path.endswith((".pyc", ".pyo", "~"))


async def watch(handlers_dir: Path, stop: anyio.Event, *, debounce_ms: int = 100) -> AsyncIterator[None]:
    """Yield once after each settled batch of changes in `handlers_dir` (the caller re-discovers).

    Ends soon after `stop` is set. (Cancelling instead would wait for watchfiles' thread to time out.)
    """
    handlers_dir.mkdir(parents=True, exist_ok=True)
    async for _changes in awatch(
        handlers_dir, watch_filter=_HandlerFilter(), debounce=debounce_ms, step=20, recursive=True, stop_event=stop
    ):
        yield
