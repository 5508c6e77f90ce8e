"""Who may do what through the Lambda and S3 APIs: the principals a request can be, and their policies.

- **Access keys** of `[http] access_keys` (id -> secret; `env:NAME` reads the secret from the service's environment)
  may do anything.
- **The admin key**, made at the first start and kept in `<data_dir>/auth/http.json` (0600, in the format of an
  AWS `credential_process`), may do anything.
- **A function's execution role**: a key pair and session token made for each function at every start (never
  written, never logged), in its workers' environment as Lambda puts its role's there. Its policy is the
  function's `[permissions]` plus reading the buckets its own bucket triggers name, and nothing else:

  | permission                      | grants                                                              |
  |---------------------------------|---------------------------------------------------------------------|
  | `s3_read = ["<bucket>/<glob>"]` | `s3:GetObject`, `s3:HeadObject` of the keys matched; `s3:ListBucket` |
  | `s3_write = ["<bucket>/<glob>"]`| `s3:PutObject` (multipart, a copy's target), `s3:DeleteObject`,      |
  |                                 | `s3:AbortMultipartUpload`, `s3:ListMultipartUploadParts` of the keys |
  | `s3_read = ["*"]`               | also `s3:ListAllMyBuckets`                                           |
  | `invoke = ["<function glob>"]`  | `lambda:InvokeFunction`, `lambda:InvokeFunctionUrl`                  |

  `lambda:GetFunction`, `lambda:GetFunctionConfiguration` and `lambda:ListFunctions` (which show functions'
  environments) are for access keys only. Globs are IAM's: `*` any run of characters (`/` too), `?` one.
- **Anyone**, without credentials, where none are required; else **refused**, with AWS's error.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from collections.abc import Container, Iterable, Mapping
from pathlib import Path
from typing import Final

import msgspec

from eventfn.broker.auth import auth_dir, write_private
from eventfn.config import ENV_SECRET, FunctionSettings, HttpSettings, secret_value
from eventfn.errors import ConfigError, EventfnError

#: The admin key's file under `<data_dir>/auth/`.
ADMIN_FILE: Final = "http.json"

S3_READ: Final = frozenset({"s3:GetObject", "s3:HeadObject"})
S3_LIST: Final = "s3:ListBucket"
S3_LIST_ALL: Final = "s3:ListAllMyBuckets"
S3_WRITE: Final = frozenset(
    {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"}
)
INVOKE: Final = frozenset({"lambda:InvokeFunction", "lambda:InvokeFunctionUrl"})
#: Every action a front asks about (an access key may do these and any other).
ACTIONS: Final = frozenset(
    {
        *S3_READ,
        S3_LIST,
        S3_LIST_ALL,
        *S3_WRITE,
        *INVOKE,
        "lambda:GetFunction",
        "lambda:GetFunctionConfiguration",
        "lambda:ListFunctions",
    }
)


def _glob(pattern: str) -> re.Pattern[str]:
    """IAM's wildcards: `*` any run of characters (`/` included), `?` one character; nothing else is special."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.DOTALL)


class _ObjectPattern:
    """`<bucket glob>/<key glob>`; a bucket alone is the whole bucket."""

    __slots__ = ("bucket", "every_bucket", "key")

    def __init__(self, pattern: str) -> None:
        bucket, slash, key = pattern.partition("/")
        self.bucket = _glob(bucket)
        self.key = _glob(key if slash else "*")
        self.every_bucket = bucket == "*"

    def covers(self, bucket: str, key: str | None) -> bool:
        """Whether the pattern matches object `key` of `bucket` (None: some object of it)."""
        return self.bucket.fullmatch(bucket) is not None and (key is None or self.key.fullmatch(key) is not None)


class Policy:
    """What a principal may do: everything, or what its patterns grant (the table in the module's docstring)."""

    __slots__ = ("everything", "invoke", "read", "write")

    def __init__(
        self,
        *,
        everything: bool = False,
        s3_read: Iterable[str] = (),
        s3_write: Iterable[str] = (),
        invoke: Iterable[str] = (),
    ) -> None:
        self.everything = everything
        self.read = [_ObjectPattern(p) for p in s3_read]
        self.write = [_ObjectPattern(p) for p in s3_write]
        self.invoke = [_glob(p) for p in invoke]

    def allows(self, action: str, resource: str) -> bool:
        """Whether `action` on `resource` (`<bucket>/<key>`, `<bucket>`, a function's name or ARN) is granted."""
        if self.everything:
            return True
        if action in S3_READ or action in S3_WRITE:
            bucket, slash, key = resource.partition("/")
            patterns = self.read if action in S3_READ else self.write
            return bool(slash) and any(p.covers(bucket, key) for p in patterns)
        if action == S3_LIST:
            bucket = resource.partition("/")[0]
            return any(p.covers(bucket, None) for p in self.read)
        if action == S3_LIST_ALL:
            return any(p.every_bucket for p in self.read)
        if action in INVOKE:
            name = function_name(resource)
            return any(p.fullmatch(name) for p in self.invoke)
        return False


#: The policy of access keys and the admin key.
EVERYTHING: Final = Policy(everything=True)


def function_name(resource: str) -> str:
    """A function's name from its name, `name:qualifier` or ARN (`arn:aws:lambda:<region>:<account>:function:...`)."""
    if resource.startswith("arn:"):
        resource = resource.partition(":function:")[2]
    return resource.partition(":")[0]


def trigger_buckets(settings: FunctionSettings) -> list[str]:
    """The buckets the function's bucket triggers name (read through the trigger's options, whatever connector
    provides the `bucket` type)."""
    try:
        triggers = settings.trigger_list()
    except EventfnError:  # checked when the settings were read: nothing to grant from a broken one
        return []
    buckets = [getattr(t, "bucket", None) for t in triggers if t.type == "bucket"]
    return list(dict.fromkeys(b for b in buckets if isinstance(b, str)))


def role_policy(settings: FunctionSettings) -> Policy:
    """A function's execution role's policy: its `[permissions]`, and reading the buckets its triggers name."""
    permissions = settings.permissions
    return Policy(
        s3_read=[*permissions.s3_read, *(f"{bucket}/*" for bucket in trigger_buckets(settings))],
        s3_write=permissions.s3_write,
        invoke=permissions.invoke,
    )


# -- principals ------------------------------------------------------------------------------------------------


class Anyone:
    """A caller without credentials, where none are required: may do anything."""

    name = "anonymous"
    problem: tuple[str, str] | None = None

    def allows(self, action: str, resource: str) -> bool:
        return True


class Refused:
    """A caller whose credentials are missing where required, or do not hold: `problem` says which (AWS's error
    code and message); it may do nothing."""

    name = "anonymous"

    def __init__(self, problem: tuple[str, str]) -> None:
        self.problem: tuple[str, str] | None = problem

    def allows(self, action: str, resource: str) -> bool:
        return False


class Principal:
    """A caller whose signature holds: an access key, the admin key, or a function's execution role."""

    __slots__ = ("access_key", "name", "policy", "secret", "token")

    problem: tuple[str, str] | None = None

    def __init__(self, name: str, access_key: str, secret: str, policy: Policy, token: str | None = None) -> None:
        #: The access key id, or `role/<function>` for an execution role.
        self.name = name
        self.access_key = access_key
        self.secret = secret
        self.policy = policy
        #: The session token its requests must carry (an execution role's), or None (they carry none).
        self.token = token

    def allows(self, action: str, resource: str) -> bool:
        return self.policy.allows(action, resource)

    def __repr__(self) -> str:  # never the secret or the token, should one be printed
        return f"Principal({self.name!r})"


def new_role(function: str, settings: FunctionSettings, taken: Container[str] = ()) -> Principal:
    """A fresh execution role for `function`: an `ASIA...` key id (not one in `taken`), a secret and a token."""
    while (key := "ASIA" + _base32(10)) in taken:
        pass
    token = base64.b64encode(secrets.token_bytes(96)).decode()
    return Principal(f"role/{function}", key, _secret(), role_policy(settings), token)


def _base32(size: int) -> str:
    return base64.b32encode(secrets.token_bytes(size)).decode().rstrip("=")


def _secret() -> str:
    """40 characters, as AWS's secret access keys have."""
    return base64.b64encode(secrets.token_bytes(30)).decode()


# -- configured keys and the admin key -------------------------------------------------------------------------


def configured_keys(settings: HttpSettings, environ: Mapping[str, str]) -> dict[str, str]:
    """`[http] access_keys` with each `env:NAME` secret read from `environ`: a `ConfigError` for one not set."""
    keys: dict[str, str] = {}
    for key, value in settings.access_keys.items():
        where = f"[http] access_keys.{key}"
        if not key or any(c in key for c in "/, =\t\r\n"):
            raise ConfigError(where, "an access key id cannot be empty or hold '/', ',', '=' or spaces")
        if value.startswith(ENV_SECRET):
            name = value.removeprefix(ENV_SECRET)
            secret = secret_value(value, environ)
            if secret is None:
                raise ConfigError(
                    where,
                    f"its secret is read from the environment variable {name}, which is not set (or empty) in the "
                    "service's environment",
                    f"set {name} where `eventfn serve` runs, or give the secret itself",
                )
            value = secret
        elif not value:
            raise ConfigError(where, "the secret is empty")
        keys[key] = value
    return keys


class _KeyFile(msgspec.Struct, frozen=True):
    """The admin key's file, in AWS's `credential_process` output format (`credential_process = cat <file>`)."""

    AccessKeyId: str
    SecretAccessKey: str
    Version: int = 1
    Description: str = "eventfn's HTTP APIs (Lambda, S3): the admin access key, made by eventfn serve"


def admin_file(data_dir: Path | str) -> Path:
    """Where the admin key of the HTTP APIs is kept."""
    return auth_dir(data_dir) / ADMIN_FILE


def admin_key(data_dir: Path | str) -> tuple[str, str]:
    """The admin key (id, secret): the one kept in the data directory, else a new one, written there (0600)."""
    path = admin_file(data_dir)
    if path.exists():
        try:
            kept = msgspec.json.decode(path.read_bytes(), type=_KeyFile)
        except (OSError, msgspec.DecodeError) as exc:
            raise ConfigError(
                str(path), f"not the admin key file it should be: {exc}", "delete it: the next start makes a new key"
            ) from exc
        if not kept.AccessKeyId or not kept.SecretAccessKey:
            raise ConfigError(str(path), "the admin key is empty", "delete the file: the next start makes a new key")
        return kept.AccessKeyId, kept.SecretAccessKey
    directory = auth_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    made = _KeyFile(AccessKeyId="AKIA" + _base32(10), SecretAccessKey=_secret())
    write_private(path, msgspec.json.format(msgspec.json.encode(made), indent=2) + b"\n")
    return made.AccessKeyId, made.SecretAccessKey
