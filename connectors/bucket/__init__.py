"""The S3-like bucket watcher (`type = "bucket"`): being written."""
