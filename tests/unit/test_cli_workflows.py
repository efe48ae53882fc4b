"""The workflow commands' own parsing: ``--valid-from`` as CCF's tooling writes it, PEMs shortened for reading, and
the options every workflow command takes (the flows themselves run in tests/e2e/test_workflows.py)."""

from __future__ import annotations

import pytest

from signing_agent.cli import build_parser
from signing_agent.cli_workflows import _shortened, valid_from
from tests.support.pki import make_member


def test_valid_from_iso_8601_becomes_ccf_s_form() -> None:
    assert valid_from("2025-01-01T00:00:00Z") == "20250101000000Z"
    assert valid_from("2025-01-01 02:30:00+02:30") == "20250101000000Z"
    assert valid_from("2025-01-01") == "20250101000000Z"  # no offset: UTC
    assert valid_from("20250101000000Z") == "20250101000000Z"  # CCF's own forms go as written
    assert valid_from("20250101123456Z") == "20250101123456Z"  # not 23:45:00, as fromisoformat reads it
    assert valid_from("250101123456Z") == "250101123456Z"
    assert valid_from("20250101123456") == "20250101123456"  # the agent refuses it, naming valid_from
    assert valid_from("whenever") == "whenever"  # the agent refuses it, naming valid_from
    assert valid_from(None) is None


def test_pems_are_shown_by_kind_and_length_certificates_by_fingerprint() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n"
    key = "-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----\n"
    member = make_member()
    action = {"name": "x", "args": {"cert": pem, "n": [key, 3], "m": member.cert_pem.decode()}}
    assert _shortened(action) == {
        "name": "x",
        "args": {
            "cert": f"<CERTIFICATE PEM that does not read as one, {len(pem)} characters>",
            "n": [f"<PUBLIC KEY PEM, {len(key)} characters>", 3],
            "m": f"<CERTIFICATE PEM sha256 {member.member_id}>",
        },
    }


@pytest.mark.parametrize(
    "command",
    [
        ["members"],
        ["nodes"],
        ["member", "add", "--cert", "c.pem"],
        ["member", "remove", "--member-id", "x"],
        ["node", "trust", "x"],
        ["node", "retire", "x"],
        ["service", "open"],
        ["service", "identity"],
        ["recovery", "accept"],
        ["recovery", "refresh-shares"],
        ["proposals", "--pending"],
    ],
)
def test_every_workflow_command_takes_the_common_options(command: list[str]) -> None:
    args = build_parser().parse_args([*command, "--service", "s", "--identity", "i", "--json", "--dry-run", "--wait"])
    assert (args.service, args.identity, args.json, args.dry_run, args.wait) == ("s", "i", True, True, True)
