"""``python -m signing_agent``."""

from __future__ import annotations

import sys

from signing_agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
