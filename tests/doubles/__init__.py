"""Test doubles of remote services: real servers on 127.0.0.1, real TLS, real crypto, scriptable faults."""
