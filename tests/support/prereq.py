"""Missing prerequisites: skip locally, fail under CI (CI=true), so a green run cannot hide a missing install."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str) -> NoReturn:
    """Skip the test (locally) or fail it (in CI) because a prerequisite is missing."""
    if in_ci():
        pytest.fail(f"prerequisite missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_executable(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (make test installs it as root)")
    return path


def require_file(path: str, what: str) -> str:
    if not os.path.exists(path):
        missing(f"{what} not found at {path} (make test installs it as root)")
    return path
