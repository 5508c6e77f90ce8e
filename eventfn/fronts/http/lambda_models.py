"""What Lambda's API says about a function (`FunctionConfiguration`, GetFunction's and ListFunctions' answers, its
error body), as msgspec Structs with Lambda's key names, and how eventfn's functions map onto them.

A function's code is described as Lambda describes a deployment package: its size, a SHA-256 of its files and
when they last changed. Reading the files costs a walk and a hash, so `CodeCache` keeps the answer per version.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import platform
import sys
import time
import uuid
from pathlib import Path

import msgspec

from eventfn.config import FunctionSettings, HttpSettings
from eventfn.invoke.functions import Function
from eventfn.invoke.registry import FunctionSource

#: The qualifier of the latest code and settings, Lambda's only unpublished version.
LATEST = "$LATEST"
#: Files of a folder function read to describe its code, at most (a stray virtualenv must not stall a request).
MAX_CODE_FILES = 10_000

RUNTIME = f"python{sys.version_info.major}.{sys.version_info.minor}"
ARCHITECTURE = "arm64" if platform.machine().lower() in ("arm64", "aarch64") else "x86_64"


# Lambda's JSON: PascalCase keys; a field whose default is None is left out when None (`omit_defaults`), as Lambda
# leaves out what a function has not: no field with a value of its own has a default.
class Environment(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="pascal"):
    variables: dict[str, str]


class LoggingConfig(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="pascal"):
    log_format: str
    log_group: str


class FunctionConfiguration(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="pascal"):
    """Lambda's `FunctionConfiguration`: what ListFunctions lists and GetFunctionConfiguration answers."""

    function_name: str
    function_arn: str
    runtime: str
    role: str
    handler: str
    code_size: int
    description: str
    timeout: int
    memory_size: int
    last_modified: str
    code_sha256: str
    version: str
    environment: Environment | None = None
    revision_id: str
    state: str
    state_reason: str | None = None
    state_reason_code: str | None = None
    last_update_status: str
    last_update_status_reason: str | None = None
    last_update_status_reason_code: str | None = None
    package_type: str
    architectures: list[str]
    logging_config: LoggingConfig


class FunctionCodeLocation(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="pascal"):
    repository_type: str
    #: A `file://` URL of the function's code on the service's machine (Lambda's is a presigned S3 URL).
    location: str


class Concurrency(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="pascal"):
    reserved_concurrent_executions: int


class GetFunctionResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="pascal"):
    configuration: FunctionConfiguration
    code: FunctionCodeLocation
    concurrency: Concurrency | None = None


class ListFunctionsResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="pascal"):
    functions: list[FunctionConfiguration]
    next_marker: str | None = None


class ErrorBody(msgspec.Struct, frozen=True):
    """Lambda's error body (its code is in the `x-amzn-ErrorType` header)."""

    Type: str
    Message: str


encoder = msgspec.json.Encoder()


class CodeInfo(msgspec.Struct, frozen=True):
    """A function's code as Lambda describes a package: bytes, base64 SHA-256, last change, where it is."""

    size: int
    sha256: str
    last_modified: str
    location: str
    #: Lambda's `Handler` where the settings name none: `<module>.<handler or lambda_handler, as defined>`.
    handler: str = ""


def code_files(source: FunctionSource) -> list[Path]:
    """The files of a function's code: a folder function's folder, or a single file and its settings and the module
    its `handler` setting names."""
    if source.folder:
        root = Path(source.task_root)
        found = []
        for path in sorted(root.rglob("*")):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            found.append(path)
            if len(found) >= MAX_CODE_FILES:
                break
        return found
    root = Path(source.task_root)
    candidates = {root / f"{source.name}.py", root / f"{source.name}.toml", Path(source.entry_file)}
    return sorted(p for p in candidates if p.is_file())


def read_code(source: FunctionSource) -> CodeInfo:
    """Size, SHA-256 and last change of a function's code files, read now (blocking: run it in a thread)."""
    root = Path(source.task_root)
    digest = hashlib.sha256()
    size, newest = 0, 0.0
    for path in code_files(source):
        try:
            data = path.read_bytes()
            mtime = path.stat().st_mtime
        except OSError:  # removed meanwhile: a reload follows
            continue
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "big"))
        digest.update(data)
        size += len(data)
        newest = max(newest, mtime)
    where = source.task_root if source.folder else source.entry_file
    return CodeInfo(
        handler=source.handler(),
        size=size,
        sha256=base64.b64encode(digest.digest()).decode("ascii"),
        last_modified=lambda_time(newest or time.time()),
        location=Path(where).as_uri() if os.path.isabs(where) else where,
    )


def lambda_time(epoch: float) -> str:
    """Lambda's `LastModified`: `2026-11-30T04:31:14.000+0000`."""
    whole = int(epoch)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((epoch - whole) * 1000):03d}+0000"


def function_arn(settings: HttpSettings, name: str, qualifier: str | None = None) -> str:
    arn = f"arn:aws:lambda:{settings.region}:{settings.account_id}:function:{name}"
    return f"{arn}:{qualifier}" if qualifier else arn


def configuration(fn: Function, http: HttpSettings, code: CodeInfo, qualifier: str = LATEST) -> FunctionConfiguration:
    """Lambda's `FunctionConfiguration` of `fn`: `$LATEST` (its latest settings) or the version serving."""
    source = fn.source
    if qualifier == LATEST:
        settings = source.settings or fn.settings or FunctionSettings()
    else:
        settings = fn.settings or source.settings or FunctionSettings()
    states = _states(fn)
    return FunctionConfiguration(
        function_name=fn.name,
        function_arn=function_arn(http, fn.name, None if qualifier == LATEST else qualifier),
        runtime=RUNTIME,
        role=f"arn:aws:iam::{http.account_id}:role/eventfn-{fn.name}",
        handler=settings.handler or code.handler,
        code_size=code.size,
        description=settings.description,
        timeout=max(1, math.ceil(settings.timeout)),
        memory_size=settings.memory,
        last_modified=code.last_modified,
        code_sha256=code.sha256,
        version=qualifier,
        # The function's own variables only: never the service's environment, nor what eventfn adds.
        environment=Environment(variables=dict(settings.environment)) if settings.environment else None,
        revision_id=str(uuid.UUID(bytes=hashlib.sha256(source.version.encode()).digest()[:16])),
        state=states[0],
        state_reason=states[1],
        state_reason_code=states[2],
        last_update_status=states[3],
        last_update_status_reason=states[4],
        last_update_status_reason_code=states[5],
        package_type="Zip",
        architectures=[ARCHITECTURE],
        logging_config=LoggingConfig(log_format="Text", log_group=f"/aws/lambda/{fn.name}"),
    )


_States = tuple[str, str | None, str | None, str, str | None, str | None]


def _states(fn: Function) -> _States:
    """Lambda's State and LastUpdateStatus (with reasons) of `fn`: a function that serves an older version while
    its latest one loads or failed to load is Active, its last update InProgress or Failed, as in Lambda."""
    serving = fn.pool is not None
    if fn.source.version == (fn.pool.version if fn.pool else None):
        return "Active", None, None, "Successful", None, None
    if fn.last_error is None:
        if serving:
            return "Active", None, None, "InProgress", "The function is being updated.", None
        return "Pending", "The function is being created.", "Creating", "InProgress", None, None
    if fn.source.error is not None:
        code = "InvalidConfiguration"
    elif fn.load_error is not None and fn.load_error.error_type == "Sandbox.Timedout":
        code = "FunctionError.InitTimeout"
    elif fn.load_error is not None and fn.load_error.error_type == "Runtime.HandlerNotFound":
        code = "FunctionError.InvalidEntryPoint"
    else:
        code = "FunctionError.RuntimeInitError"
    if serving:
        return "Active", None, None, "Failed", fn.last_error, code
    return "Failed", fn.last_error, code, "Failed", fn.last_error, code


class CodeCache:
    """`read_code` per function, kept for its latest version."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[str, CodeInfo]] = {}

    def get(self, source: FunctionSource) -> CodeInfo | None:
        known = self._known.get(source.name)
        return known[1] if known is not None and known[0] == source.version else None

    def put(self, source: FunctionSource, info: CodeInfo) -> None:
        self._known[source.name] = (source.version, info)

    def forget_except(self, names: set[str]) -> None:
        """Drop what is kept of functions no longer there."""
        for name in [n for n in self._known if n not in names]:
            del self._known[name]
