"""Benchmarks: the HBONE tunnel against a plain TLS relay pair, stunnel and direct traffic."""
