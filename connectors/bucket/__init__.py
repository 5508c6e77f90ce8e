"""The S3-like bucket watcher (`type = "bucket"`): folders under the buckets root are buckets, and files written
into, moved into and removed from them reach functions as S3 event notifications, exactly as S3 shapes them. The
same buckets are served over HTTP as a subset of S3's REST API (`s3api`: the connector's `http_front`), whose
writes make the same events, once each.

Public names:
- `BucketConnector`: the connector (entry point `eventfn.connectors: bucket`);
- `BucketTrigger`: a bucket trigger's options (`bucket`, `events`, `prefix`, `suffix` and the mapping settings);
- `BucketSettings`: `[buckets]` in `eventfn.toml` (`root`, `ignore`, `ignore_hidden`, `settle`, `debounce`,
  `rescan_interval`, `announce_existing`);
- `object_path(record)`: the file of the object a record names, under `$EVENTFN_BUCKETS_ROOT`;
- `encode_key` / `decode_key`: keys as S3 notifications encode them, and back.
"""

from __future__ import annotations

from eventfn_connectors.bucket.files import ROOT_VARIABLE, object_path
from eventfn_connectors.bucket.options import DEFAULT_IGNORE, BucketSettings, BucketTrigger
from eventfn_connectors.bucket.records import S3Shape, decode_key, encode_key
from eventfn_connectors.bucket.watcher import BucketConnector

__all__ = [
    "DEFAULT_IGNORE",
    "ROOT_VARIABLE",
    "BucketConnector",
    "BucketSettings",
    "BucketTrigger",
    "S3Shape",
    "decode_key",
    "encode_key",
    "object_path",
]
