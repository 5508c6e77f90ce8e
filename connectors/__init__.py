"""Built-in connectors, shipped under the import name `eventfn_connectors`.

A connector turns an outside source (a bucket folder, a queue, a stream shard, a cron schedule, HTTP) into
normalized events. Connectors register under the entry-point group `eventfn.connectors`; each gets a
`publish` callable and its validated config, and never sees NATS itself.
"""
