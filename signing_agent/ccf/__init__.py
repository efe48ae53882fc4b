"""The CCF client: governance requests over TLS pinned to the service certificate."""
