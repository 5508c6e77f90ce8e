"""The cron scheduler (`type = "schedule"`): being written."""
