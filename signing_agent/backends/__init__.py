"""Key-store backends behind the ``SigningKey`` / ``DecryptionKey`` Protocols (see ``base``)."""
