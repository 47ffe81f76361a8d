"""Differential session fuzzer: the gateway against a RabbitMQ node with the OAuth 2.0 plugin (docs/conformance.md)."""
