"""A rate limit holds across SIGHUP reloads: a caller cannot refill its bucket by waiting for (or causing) a reload.

The real daemon as a subprocess; the caller is another uid in its own process, so the limit is charged to the uid the
kernel reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.component.test_policy_api import NOBODY, as_nobody, config_for
from tests.e2e.test_lifecycle import sighup_and_wait
from tests.support.agent import daemon
from tests.support.pki import make_member

pytestmark = pytest.mark.e2e

SIGN = ("POST", "/v1/sign", {"identity": "m0", "msg_type": "state_digest"})


def statuses(results: list[tuple[int, Any]]) -> list[int]:
    return [status for status, _ in results]


def test_a_reload_does_not_refill_a_rate_limit(workdir: Path) -> None:
    members = {"m0": make_member("m0")}
    rule = {"name": "nobody", "uids": [NOBODY], "msg_types": ["state_digest"], "rate_limit": 2, "rate_window": 3600.0}
    config = config_for(workdir, members, [rule])
    assert config.path is not None
    with daemon(config.path) as proc:
        assert statuses(as_nobody(proc.socket, [SIGN, SIGN, SIGN])) == [200, 200, 403]

        sighup_and_wait(proc, "configuration reloaded", 1)
        [(status, body)] = as_nobody(proc.socket, [SIGN])
        assert status == 403, body
        assert "rate limit of 2 per 3600 s for uid 65534" in body["error"]["message"]

        # A rule whose limit grew keeps its (empty) bucket: the caller gets no fresh burst of 5.
        config_for(workdir, members, [{**rule, "rate_limit": 5}])
        sighup_and_wait(proc, "configuration reloaded", 2)
        [(status, body)] = as_nobody(proc.socket, [SIGN])
        assert status == 403, body
        assert "rate limit of 5 per 3600 s" in body["error"]["message"]
