"""Fronts: thin adapters from a transport (NATS request/reply today, HTTP next) to the one invocation call."""
