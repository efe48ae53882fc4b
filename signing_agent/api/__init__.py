"""The HTTP/1.1 JSON API served on the agent's Unix socket."""
