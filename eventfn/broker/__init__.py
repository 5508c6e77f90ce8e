"""The broker: the embedded nats-server, its users and permissions, and `Bus`, the only module that talks to NATS."""
