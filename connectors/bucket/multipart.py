"""Multipart uploads of the S3 API: each upload a folder under the staging folder (`<root>/.eventfn-uploads/<id>/`,
on the buckets' filesystem, where the watcher never looks), its parts files in it, the object assembled from them
into a staged file that is then renamed over the key like any other write.

- `upload.json`: the bucket, the key, the headers and metadata given at CreateMultipartUpload;
- `part-<number>-<ns>-<md5>`: a part as uploaded, its ETag in its name (nothing else to keep in step); a part
  uploaded again under the same number replaces the older one (the newest `<ns>` wins, even between two
  concurrent uploads of one number).

Everything here blocks: the API calls it through `anyio.to_thread`.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import msgspec

from eventfn_connectors.bucket.s3xml import S3Error, invalid_argument, no_such_upload
from eventfn_connectors.bucket.store import STAGING, Staged, staging_dir

#: S3's limits: part numbers, and the size every part but the last must reach.
MAX_PARTS = 10_000
MIN_PART_BYTES = 5 * 1024 * 1024
_UPLOAD_ID = re.compile(r"[0-9a-f]{40}\Z")
_PART = re.compile(r"part-(\d{5})-(\d+)-([0-9a-f]{32})\Z")
_COPY_CHUNK = 8 << 20


class Upload(msgspec.Struct, frozen=True, kw_only=True):
    """What CreateMultipartUpload was told."""

    bucket: str
    key: str
    headers: dict[str, str] = {}
    user: dict[str, str] = {}
    initiated: float = 0.0


class Part(NamedTuple):
    number: int
    etag: str
    size: int
    mtime: float
    path: Path


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Upload)


def part_number(text: str | None) -> int:
    """A `partNumber` parameter, checked."""
    if text is None or not (text.isascii() and text.isdigit()) or len(text) > 5 or not 1 <= int(text) <= MAX_PARTS:
        raise invalid_argument(
            f"Part number must be an integer between 1 and {MAX_PARTS}, inclusive", "partNumber", text or ""
        )
    return int(text)


class Uploads:
    """The multipart uploads under a buckets root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _folder(self, upload_id: str) -> Path:
        if not _UPLOAD_ID.match(upload_id):
            raise no_such_upload(upload_id)
        return self.root / STAGING / upload_id

    def create(self, upload: Upload) -> str:
        """Start an upload; returns its id."""
        upload_id = secrets.token_hex(20)
        folder = staging_dir(self.root) / upload_id
        folder.mkdir(mode=0o700)
        (folder / "upload.json").write_bytes(_encoder.encode(upload))
        return upload_id

    def get(self, upload_id: str, bucket: str, key: str) -> Upload:
        """The upload `upload_id` of `key` in `bucket`; NoSuchUpload if there is none (or it is another key's)."""
        try:
            upload = _decoder.decode((self._folder(upload_id) / "upload.json").read_bytes())
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            raise no_such_upload(upload_id) from None
        if (upload.bucket, upload.key) != (bucket, key):
            raise no_such_upload(upload_id)
        return upload

    def add_part(self, upload_id: str, number: int, staged: Staged, md5: str) -> None:
        """Keep the staged body as part `number` of the upload, replacing an older upload of that number."""
        folder = self._folder(upload_id)
        name = f"part-{number:05d}-{time.time_ns()}-{md5}"
        staged.close()
        try:
            os.rename(staged.path, folder / name)
        except FileNotFoundError:
            raise no_such_upload(upload_id) from None  # aborted or completed meanwhile
        mine = int(name.split("-")[2])
        for other in self._files(folder):
            match = _PART.match(other.name)
            if match and int(match.group(1)) == number and int(match.group(2)) < mine:
                other.unlink(missing_ok=True)

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        try:
            return list(folder.iterdir())
        except FileNotFoundError:
            return []

    def parts(self, upload_id: str) -> dict[int, Part]:
        """The newest part of each number."""
        found: dict[int, tuple[int, Part]] = {}
        for path in self._files(self._folder(upload_id)):
            match = _PART.match(path.name)
            if not match:
                continue
            number, ns, md5 = int(match.group(1)), int(match.group(2)), match.group(3)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if number not in found or found[number][0] < ns:
                found[number] = (ns, Part(number, md5, st.st_size, st.st_mtime, path))
        return {number: part for number, (_, part) in sorted(found.items())}

    def assemble(self, upload_id: str, chosen: list[tuple[int, str]], staged: Staged) -> str:
        """Write the parts `chosen` (number, ETag), in order, into `staged`; returns the object's ETag (the MD5 of
        the parts' MD5s, `-` and their count, as S3's). S3's errors for parts out of order, unknown or too small."""
        parts = self.parts(upload_id)
        numbers = [number for number, _ in chosen]
        if any(b <= a for a, b in itertools.pairwise(numbers)):
            raise S3Error(
                400, "InvalidPartOrder", "The list of parts was not in ascending order: list each part once, by number."
            )
        digests = hashlib.md5(usedforsecurity=False)
        for i, (number, etag) in enumerate(chosen):
            part = parts.get(number)
            if part is None or part.etag != etag:
                raise S3Error(
                    400,
                    "InvalidPart",
                    "One or more of the specified parts could not be found: the part may not have been uploaded, "
                    "or the specified ETag may not match the part's ETag.",
                    PartNumber=str(number),
                    ETag=etag,
                    UploadId=upload_id,
                )
            if i < len(chosen) - 1 and part.size < MIN_PART_BYTES:
                raise S3Error(
                    400,
                    "EntityTooSmall",
                    f"Your proposed upload is smaller than the minimum allowed object size: part {number} is "
                    f"{part.size} bytes, and every part but the last needs {MIN_PART_BYTES} (5 MiB) at least.",
                    PartNumber=str(number),
                    MinSizeAllowed=str(MIN_PART_BYTES),
                    ProposedSize=str(part.size),
                )
            digests.update(bytes.fromhex(part.etag))
        for number, _ in chosen:
            _append(parts[number].path, staged)
        return f"{digests.hexdigest()}-{len(chosen)}"

    def remove(self, upload_id: str) -> bool:
        """Forget the upload and its parts; False if there was none."""
        folder = self._folder(upload_id)
        if not folder.is_dir():
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return True


def _append(path: Path, staged: Staged) -> None:
    """Add the file at `path` to the end of `staged` (in the kernel where it can)."""
    with open(path, "rb") as source:
        size = os.fstat(source.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                copied = os.copy_file_range(source.fileno(), staged.fd, min(_COPY_CHUNK, size - offset), offset)
            except OSError:
                copied = 0
            if copied <= 0:  # not available here (another kernel, another filesystem): by hand
                data = os.pread(source.fileno(), min(_COPY_CHUNK, size - offset), offset)
                if not data:
                    raise OSError(f"part {path.name} shrank while it was being assembled")
                staged.write(data)
                copied = len(data)
            else:
                staged.size += copied
            offset += copied
