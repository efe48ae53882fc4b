"""Print the architecture figures issue #11 tracks, so a reviewer can rerun them.

Run `python scripts/architecture_report.py` (exit 1 when a figure is off its target). Each figure is a count over
`signing_agent/` (the sandbox, CCF's test double, left out) that should stay at its target as the code changes. The
counts are textual (what a newcomer would grep for), not a parse of the code.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "signing_agent"
USE_CASES = ("service.py", "governance.py", "recovery/", "workflows.py", "health.py")


def sources(*, skip: tuple[str, ...] = (), only: tuple[str, ...] = ("",)) -> Iterator[tuple[Path, str]]:
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("sandbox/") or rel.startswith(skip) or not rel.startswith(only):
            continue
        yield path, path.read_text()


def count(pattern: str, *, skip: tuple[str, ...] = (), only: tuple[str, ...] = ("",)) -> tuple[int, list[str]]:
    """Lines matching ``pattern``, and where (file:line): in the files under ``only``, outside those under ``skip``."""
    regex = re.compile(pattern)
    places = [
        f"{path.relative_to(ROOT.parent)}:{n}"
        for path, text in sources(skip=skip, only=only)
        for n, line in enumerate(text.splitlines(), 1)
        if regex.search(line) and not line.lstrip().startswith("#")
    ]
    return len(places), places


def config_any() -> tuple[int, list[str]]:
    text = (ROOT / "config.py").read_text()
    lines = [
        f"signing_agent/config.py:{n}" for n, line in enumerate(text.splitlines(), 1) if re.search(r"\bAny\b", line)
    ]
    return len(lines), lines


CHECKS: list[tuple[str, int, Callable[[], tuple[int, list[str]]]]] = [
    (
        "audit records built as dicts outside audit.py (record(event, {...}))",
        0,
        lambda: count(r"\.record\(\s*\"[a-z_]+\"", skip=("audit.py",)),
    ),
    (
        'CCF path literals outside ccf/ ("/gov/...", "/node/...")',
        0,
        lambda: count(r"[\"']/(gov|node)/", skip=("ccf/",)),
    ),
    ("places that construct a CCFClient", 1, lambda: count(r"(?<![\w.])CCFClient\(")),
    ("copies of the daemon's wiring (open_generation definitions)", 1, lambda: count(r"def open_generation\(")),
    (
        "caller/request_id parameters threaded through the use cases' signatures (the request context carries them)",
        0,
        lambda: count(r"\b(caller|request_id)\s*:\s*", only=USE_CASES),
    ),
    ("retry engines (RetryPolicy definitions)", 1, lambda: count(r"^class RetryPolicy\b")),
    ("`Any` in config.py", 0, lambda: config_any()),
]


def main() -> int:
    failed = 0
    for name, target, measure in CHECKS:
        value, places = measure()
        ok = value == target
        failed += not ok
        verdict = "ok  " if ok else "OFF "
        print(f"{verdict} {value:3d} (target {target}) {name}")
        if not ok:
            for place in places[:10]:
                print(f"          {place}")
    print("coverage: `make test` prints it and fails under tool.coverage.report.fail_under (pyproject.toml)")
    print("duplicates: run `duplicates --repo signing_agent --most 40` (boilerplate aside, the rows left to merge)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
