"""The checks of ``signing_agent.proposals``: what CCF's default constitution would refuse, refused before signing.

Each refusal names the action and the argument, and quotes CCF's own message where CCF has one. The checks that
read the service's state take ``ServiceFacts`` (here made by hand; read from a service in tests/unit/test_workflows.py
and through the daemon in tests/e2e/test_workflows.py). The agent's reading of ``valid_from`` is compared with the
sandbox's port of CCF's parser, which has CCF's quirks.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from signing_agent import proposals
from signing_agent.errors import InvalidRequestError
from signing_agent.proposals import MemberFact, Needs, ServiceFacts, ccf_x509_time, check_proposal, needs
from signing_agent.sandbox.clock import parse_x509_time
from signing_agent.sandbox.identity import ServiceIdentity
from tests.support.pki import make_member, make_rsa_key, pem_public

CERT = make_member("m").cert_pem.decode()
RSA = pem_public(make_rsa_key().public_key()).decode()
SERVICE = ServiceIdentity.generate().cert_pem.decode()
PREVIOUS = ServiceIdentity.generate().cert_pem.decode()
NODE = "ab" * 32


def payload(*actions: dict[str, Any]) -> bytes:
    return json.dumps({"actions": list(actions)}).encode()


def refused(proposal: bytes, facts: ServiceFacts | None = None) -> str:
    with pytest.raises(InvalidRequestError) as info:
        check_proposal(proposal, facts)
    assert info.value.message.endswith("; nothing was signed")
    return info.value.message


def facts(**fields: Any) -> ServiceFacts:
    base: dict[str, Any] = {"status": "Open", "identity": SERVICE, "identity_trusted": True, "recovery_threshold": 1}
    return ServiceFacts(service="prod", **{**base, **fields})


# -- the arguments ---


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ({"name": "set_member"}, "actions[0] set_member: args: must be an object"),
        ({"name": "set_member", "args": {"cert": 5}},
         'args.cert: must be a string (CCF: "cert must be of type string but is number")'),
        ({"name": "set_member", "args": {"cert": "hello"}},
         'args.cert: is not a PEM X.509 certificate (CCF: "cert must be a valid X509 certificate (bundle) in PEM'),
        ({"name": "set_member", "args": {"cert": CERT, "member_data": "x"}},
         'args.member_data: must be a JSON object (CCF: "member_data must be of type object but is string")'),
        ({"name": "set_member", "args": {"cert": CERT, "recovery_role": "Participant"}},
         "args.recovery_role: needs encryption_pub_key (CCF: \"Cannot specify a recovery_role value when"),
        ({"name": "set_member", "args": {"cert": CERT, "encryption_pub_key": RSA, "recovery_role": None}},
         "args.recovery_role: None is not one of NonParticipant, Participant, Owner"),
        ({"name": "set_member", "args": {"cert": CERT, "encryption_pub_key": RSA, "recovery_role": "Boss"}},
         'CCF: "recovery_role must be one of NonParticipant,Participant,Owner"'),
        ({"name": "set_member", "args": {"cert": CERT, "encryption_pub_key": CERT}},
         "args.encryption_pub_key: is not a PEM public key"),
        ({"name": "set_member", "args": {"cert": CERT, "encryption_pub_key": pem_public(make_rsa_key(1024)
                                                                                       .public_key()).decode()}},
         "args.encryption_pub_key: is RSA-1024: an encryption key needs at least 2048 bits"),
        ({"name": "set_member", "args": {"cert": CERT, "encryption_pub_key": 7}}, "args.encryption_pub_key: must be"),
        ({"name": "remove_member", "args": {"cert": CERT}}, "args.member_id: is required"),
        ({"name": "remove_member", "args": {"member_id": "ab"}},
         "args.member_id: 'ab' is not 64 hex characters (CCF: \"member_id must contain exactly 64 characters\")"),
        ({"name": "remove_member", "args": {"member_id": "AB" * 32}}, "args.member_id: must be lower case"),
        ({"name": "set_member_data", "args": {"member_id": "x" * 64, "member_data": {}}}, "args.member_id"),
        ({"name": "transition_node_to_trusted", "args": {"node_id": NODE}}, "args.valid_from: must be a string"),
        ({"name": "transition_node_to_trusted", "args": {"node_id": NODE, "valid_from": "soon"}},
         "args.valid_from: 'soon' is not a time CCF's X.509 parser reads as meant"),
        ({"name": "transition_node_to_trusted",
          "args": {"node_id": NODE, "valid_from": "20240101000000Z", "validity_period_days": 0}},
         "args.validity_period_days: 0 is not a whole number of days from 1"),
        ({"name": "transition_node_to_trusted",
          "args": {"node_id": NODE, "valid_from": "20240101000000Z", "validity_period_days": True}},
         "args.validity_period_days"),
        ({"name": "remove_node", "args": {"node_id": NODE[:-1]}}, "args.node_id"),
        ({"name": "trigger_recovery_shares_refresh", "args": {}},
         'args: must be left out: this action takes no args at all, not even {} (CCF: "Proposal does not accept any '
         'argument, found "[object Object]"")'),
        ({"name": "trigger_ledger_rekey", "args": [1, True]}, 'found "1,true"'),
        ({"name": "transition_service_to_open", "args": {}},
         'CCF: "next service identity (PEM certificate) must be of type string but is undefined"'),
        ({"name": "transition_service_to_open", "args": {"next_service_identity": SERVICE,
                                                         "previous_service_identity": None}},
         "args.previous_service_identity: must be a string"),
        ({"name": "transition_service_to_open", "args": {"next_service_identity": SERVICE + CERT}},
         "args.next_service_identity: is a bundle: a service identity is exactly one certificate"),
    ],
)  # fmt: skip
def test_arguments_ccf_would_refuse(action: dict[str, Any], expected: str) -> None:
    assert expected in refused(payload(action))


@pytest.mark.parametrize(
    "action",
    [
        proposals.set_member(CERT),
        proposals.set_member(CERT, encryption_pub_key=RSA, member_data={"a": 1}, recovery_role="Owner"),
        {"name": "set_member", "args": {"cert": CERT, "member_data": None, "encryption_pub_key": None}},
        proposals.remove_member("ab" * 32),
        proposals.trust_node(NODE, "20240101000000Z", 30),
        proposals.remove_node(NODE),
        proposals.open_service(SERVICE),
        proposals.refresh_shares(),
        {"name": "trigger_recovery_shares_refresh", "args": None},
        {"name": "set_constitution", "args": {"constitution": "anything: not checked here"}},
        {"name": "a_custom_action", "args": 3},
    ],
)
def test_arguments_ccf_accepts(action: dict[str, Any]) -> None:
    check_proposal(payload(action), None)


def test_the_refusal_names_the_position_of_the_action() -> None:
    message = refused(payload(proposals.remove_node(NODE), {"name": "remove_node", "args": {"node_id": "x"}}))
    assert message.startswith("actions[1] remove_node: args.node_id:")


def test_what_the_checks_need_of_the_service() -> None:
    assert needs(payload(proposals.set_member(CERT), proposals.remove_node(NODE))) == Needs.NOTHING
    assert needs(payload(proposals.trust_node(NODE, "x"))) == Needs.NOTHING
    assert needs(payload(proposals.trust_node(NODE, "x", 3))) == Needs.INFO
    assert needs(payload(proposals.open_service(SERVICE))) == Needs.INFO | Needs.MEMBERS
    assert Needs.PREVIOUS_IDENTITY in needs(payload(proposals.open_service(SERVICE, PREVIOUS)))
    assert needs(payload(proposals.remove_member("ab" * 32))) == Needs.INFO | Needs.MEMBERS
    assert needs(payload(proposals.refresh_shares())) == Needs.INFO | Needs.MEMBERS
    assert needs(b'{"actions": "x"}') == Needs.NOTHING
    assert needs(b"[]") == Needs.NOTHING


# -- against the service's state ---


def test_the_next_identity_is_the_one_the_service_presents_as_the_same_text() -> None:
    check_proposal(payload(proposals.open_service(SERVICE)), facts(status="Opening"))
    other = refused(payload(proposals.open_service(PREVIOUS)), facts())
    assert "args.next_service_identity: is sha256" in other
    assert "not the identity service 'prod' presents" in other
    rewrapped = refused(payload(proposals.open_service(SERVICE.replace("\n", "\r\n"))), facts())
    assert "not the same PEM text" in rewrapped
    untrusted = refused(payload(proposals.open_service(SERVICE)), facts(identity_trusted=False))
    assert "which this agent does not trust" in untrusted
    assert "reported no service identity" in refused(payload(proposals.open_service(SERVICE)), facts(identity=None))


def test_the_previous_identity_only_while_recovering_and_the_one_recovered_from() -> None:
    recovering = facts(status="Recovering", recovered_from=PREVIOUS, recovered_from_known=True)
    check_proposal(payload(proposals.open_service(SERVICE, PREVIOUS)), recovering)
    missing = refused(payload(proposals.open_service(SERVICE)), recovering)
    assert "is required: service 'prod' is Recovering (CCF: \"Opening a recovering network requires both" in missing
    wrong = refused(payload(proposals.open_service(SERVICE, SERVICE)), recovering)
    assert "args.previous_service_identity: is sha256" in wrong
    assert "not the identity service 'prod' recovered from" in wrong
    assert "not the same PEM text" in refused(
        payload(proposals.open_service(SERVICE, PREVIOUS.replace("\n", "\r\n"))), recovering
    )
    none = facts(status="Recovering", recovered_from=None, recovered_from_known=True)
    assert "Recovery with service certificates requires both" in refused(
        payload(proposals.open_service(SERVICE, PREVIOUS)), none
    )
    unknown = facts(status="Recovering", recovered_from_known=False)  # an older CCF: cannot be checked
    check_proposal(payload(proposals.open_service(SERVICE, PREVIOUS)), unknown)
    open_service = refused(payload(proposals.open_service(SERVICE, PREVIOUS)), facts())
    assert "args.previous_service_identity: service 'prod' is Open, not Recovering" in open_service


def test_opening_a_new_service_needs_members_to_issue_shares_to() -> None:
    recovery_member = MemberFact("a" * 64, "Active", recovery_member=True)
    opening = facts(status="Opening", members=(MemberFact("b" * 64, "Active", recovery_member=False),))
    assert "Failed to issue recovery shares: There should be at least one active recovery member" in refused(
        payload(proposals.open_service(SERVICE)), opening
    )
    check_proposal(payload(proposals.open_service(SERVICE)), facts(status="Opening", members=(recovery_member,)))
    check_proposal(payload(proposals.open_service(SERVICE)), facts(members=()))  # Open: CCF does nothing


def test_removing_a_recovery_member_below_the_threshold() -> None:
    members = tuple(MemberFact(c * 64, "Active", recovery_member=True) for c in "ab")
    state = facts(members=members, recovery_threshold=2)
    message = refused(payload(proposals.remove_member("a" * 64)), state)
    assert "service 'prod' would refuse it (CCF: \"Number of active recovery members (1) would be less than" in message
    check_proposal(payload(proposals.remove_member("a" * 64)), facts(members=members, recovery_threshold=1))
    check_proposal(payload(proposals.remove_member("c" * 64)), state)  # not a member: CCF does nothing


def test_the_validity_period_within_the_service_maximum() -> None:
    state = facts(max_node_validity_days=365)
    check_proposal(payload(proposals.trust_node(NODE, "20240101000000Z", 365)), state)
    assert "Validity period 366 is not allowed: max allowed is 365" in refused(
        payload(proposals.trust_node(NODE, "20240101000000Z", 366)), state
    )


def test_refreshing_shares_needs_enough_recovery_members() -> None:
    def member(c: str, role: str | None = None) -> MemberFact:
        return MemberFact(c * 64, "Active", recovery_member=True, recovery_role=role)

    refresh = payload(proposals.refresh_shares())
    assert "at least one active recovery member" in refused(refresh, facts(members=()))
    assert "Recovery threshold 2 should be equal to or less than the number of active recovery members 1" in refused(
        refresh, facts(members=(member("a"),), recovery_threshold=2)
    )
    assert "only active recovery owner members (1)" in refused(
        refresh, facts(members=(member("a", "Owner"),), recovery_threshold=2)
    )
    check_proposal(refresh, facts(members=(member("a"), member("b", "Owner")), recovery_threshold=1))
    assert member("a", "NonParticipant").role() == "NonParticipant"
    assert MemberFact("a" * 64, "Active", recovery_member=False, recovery_role="Owner").role() == "NonParticipant"


# -- valid_from as CCF reads it ---


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("240101000000Z", "2024-01-01T00:00:00"),
        ("20240101000000Z", "2024-01-01T00:00:00"),
        ("2024-01-01 00:00:00", "2024-01-01T00:00:00"),
        ("2024-01-01T10:20:30.5", "2024-01-01T10:20:30.500000"),
        ("2024-01-01T10:20:30Z", "2024-01-01T10:20:30"),
        ("2024-01-01 10:20:30+05:30", "2024-01-01T04:50:30"),
        ("2024-01-01T10:20:30-05:00", "2024-01-01T15:20:30"),
    ],
)
def test_valid_from_forms_ccf_reads_as_meant(text: str, utc: str) -> None:
    expected = datetime.datetime.fromisoformat(utc).replace(tzinfo=datetime.UTC).replace(microsecond=0)
    assert ccf_x509_time(text) == expected
    assert parse_x509_time(text).replace(microsecond=0) == expected


@pytest.mark.parametrize(
    "text",
    [
        "yesterday",
        "2024-13-01T00:00:00Z",
        "991231000000Z",  # 1999 or 2099, depending on CCF's parser
        "2024-01-01T00:00:00-05:30",  # CCF moves it by 4:30
        "2024-01-01T00:00:00+0530",  # CCF ignores the offset after a T
        "2024-01-01",
    ],
)
def test_valid_from_forms_refused(text: str) -> None:
    with pytest.raises(ValueError, match="write YYYYMMDDHHMMSSZ"):
        ccf_x509_time(text)


@given(
    when=st.datetimes(min_value=datetime.datetime(2000, 1, 1), max_value=datetime.datetime(2049, 12, 31)),
    offset=st.sampled_from(["", "Z", "+00:00", "+05:30", "-03:00", "+12:45"]),
    form=st.sampled_from(["%Y%m%d%H%M%S", "%y%m%d%H%M%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"]),
)
def test_whatever_the_agent_accepts_ccf_reads_the_same(when: datetime.datetime, offset: str, form: str) -> None:
    compact = form.startswith("%Y%m") or form.startswith("%y")
    text = when.strftime(form) + ("Z" if compact else offset)
    assert ccf_x509_time(text) == parse_x509_time(text)


def test_x509_time_is_the_form_ccf_tooling_writes() -> None:
    when = datetime.datetime(2025, 3, 4, 5, 6, 7, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
    assert proposals.x509_time(when) == "20250304040607Z"


def test_builders() -> None:
    assert proposals.set_member(CERT) == {"name": "set_member", "args": {"cert": CERT}}
    assert proposals.refresh_shares() == {"name": "trigger_recovery_shares_refresh"}
    assert proposals.open_service(SERVICE, PREVIOUS)["args"] == {
        "previous_service_identity": PREVIOUS,
        "next_service_identity": SERVICE,
    }
    assert proposals.proposal(proposals.remove_node(NODE)) == {"actions": [proposals.remove_node(NODE)]}
    assert proposals.member_id_of(CERT) == make_member_id(CERT)
    with pytest.raises(InvalidRequestError, match=r"cert: not a PEM X\.509 certificate"):
        proposals.member_id_of("nope")
    assert proposals.fingerprint("nope") is None


def make_member_id(pem: str) -> str:
    from signing_agent.certs import certificate_der, der_sha256

    der = certificate_der(pem)
    assert der is not None
    return der_sha256(der)


def test_a_service_reporting_its_identity_as_a_bundle_gets_no_transition_to_it() -> None:
    """Even a pinned service (a compromised one) that reports a bundle beginning with the trusted certificate: the
    members would vote every certificate in it into trust."""
    bundle = SERVICE + CERT
    refusal = refused(payload(proposals.open_service(bundle)), facts(identity=bundle))
    assert "is a bundle: a service identity is exactly one certificate" in refusal
