"""COSE_Sign1 for CCF governance. Pure: bytes and dataclasses in, bytes out; no I/O, no key stores, no network."""
