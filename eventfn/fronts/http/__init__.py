"""The HTTP front: one server (`server`), routing to the APIs it serves (`app`), authentication (`auth`), and the
APIs themselves: function URLs, routes and webhooks, Lambda's Invoke API, and a connector's (the bucket
watcher's S3 API)."""
