"""Signed envelopes: every way to slip a message past a receiver is dropped with its reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus import subjects
from bus.envelope import MAX_MESSAGE_BYTES, Accepted, Dropped, Envelope, Verifier, canonical, seal
from bus.keys import Signer, generate_user_seed
from bus.messages import Heartbeat, Vote

RIVEN = Signer(generate_user_seed())
OTTO = Signer(generate_user_seed())
REPAIR = "01jd0000000000000000000000"
NOW = datetime(2026, 11, 27, 6, 0, tzinfo=UTC)


def vote(signer: Signer = RIVEN, sender: str = "riven", at: datetime = NOW) -> Envelope:
    body = Vote(verdict="approve", reason="cp-2 NotReady for 184s", observed_at=at,
                policy_digest="d" * 64)
    return seal("vote", sender=sender, host="cp-1", body=body, signer=signer, repair=REPAIR, at=at)


def verifier() -> Verifier:
    return Verifier(keys={"riven": RIVEN.public_key, "otto": OTTO.public_key})


def reason(outcome: Accepted | Dropped) -> str:
    assert isinstance(outcome, Dropped), outcome
    return outcome.reason


def test_a_sealed_vote_is_accepted_once() -> None:
    v = verifier()
    data = vote().to_bytes()
    assert isinstance(v.check(subjects.vote(REPAIR, "riven"), data, NOW), Accepted)
    assert reason(v.check(subjects.vote(REPAIR, "riven"), data, NOW)) == "replayed"
    assert v.dropped == {"replayed": 1}


def test_the_wire_form_is_canonical_json_people_can_read() -> None:
    data = vote().to_bytes()
    obj = json.loads(data)
    assert list(obj) == sorted(obj)
    assert obj["from"] == "riven"
    assert obj["at"] == "2026-11-27T06:00:00.000Z"
    assert b" " not in canonical(obj).replace(b"cp-2 NotReady for 184s", b"")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda o: o["body"].__setitem__("reason", "drain every node"), "bad-signature"),
        (lambda o: o.__setitem__("sig", o["sig"][:-4] + "AAAA"), "bad-signature"),
        (lambda o: o.__setitem__("sig", "!!!"), "bad-signature"),
        (lambda o: o.__setitem__("v", 2), "unknown-version"),
        (lambda o: o.__setitem__("from", "otto"), "subject-mismatch"),
        (lambda o: o.__setitem__("key", OTTO.public_key), "wrong-key"),
        (lambda o: o.__delitem__("sig"), "malformed"),
        (lambda o: o["body"].__setitem__("verdict", "maybe"), "malformed"),
        (lambda o: o.__setitem__("extra", 1), "malformed"),
    ],
)
def test_tampering_is_dropped_with_its_reason(mutate: object, expected: str) -> None:
    obj = json.loads(vote().to_bytes())
    mutate(obj)  # type: ignore[operator]
    v = verifier()
    outcome = v.check(subjects.vote(REPAIR, "riven"), json.dumps(obj).encode(), NOW)
    assert reason(outcome) == expected
    assert v.dropped[expected] == 1


def test_a_vote_signed_by_otto_claiming_to_be_riven_is_dropped() -> None:
    forged = vote(signer=OTTO, sender="riven").to_bytes()
    assert reason(verifier().check(subjects.vote(REPAIR, "riven"), forged, NOW)) == "wrong-key"


def test_a_vote_on_another_personas_subject_is_dropped() -> None:
    data = vote().to_bytes()
    assert reason(verifier().check(subjects.vote(REPAIR, "otto"), data, NOW)) == "subject-mismatch"
    other = "01jd0000000000000000000001"
    assert reason(verifier().check(subjects.vote(other, "riven"), data, NOW)) == "subject-mismatch"


def test_unknown_sender_stale_and_future_messages_are_dropped() -> None:
    v = Verifier(keys={"otto": OTTO.public_key})
    outcome = v.check(subjects.vote(REPAIR, "riven"), vote().to_bytes(), NOW)
    assert reason(outcome) == "unknown-sender"
    v = verifier()
    old = vote(at=NOW - timedelta(minutes=2)).to_bytes()
    assert reason(v.check(subjects.vote(REPAIR, "riven"), old, NOW)) == "stale"
    future = vote(at=NOW + timedelta(minutes=2)).to_bytes()
    assert reason(v.check(subjects.vote(REPAIR, "riven"), future, NOW)) == "stale"


def test_garbage_and_oversized_messages_are_dropped() -> None:
    v = verifier()
    assert reason(v.check("zeta.repair.x.vote.riven", b"\xff{not json", NOW)) == "not-json"
    assert reason(v.check("zeta.repair.x.vote.riven", b"[1,2]", NOW)) == "malformed"
    big = b"{" + b" " * MAX_MESSAGE_BYTES + b"}"
    assert reason(v.check("zeta.repair.x.vote.riven", big, NOW)) == "oversized"


def test_a_forgery_does_not_poison_the_replay_memory() -> None:
    v = verifier()
    genuine = vote()
    forged = json.loads(genuine.to_bytes())
    forged["body"]["reason"] = "x"
    assert reason(v.check(subjects.vote(REPAIR, "riven"), json.dumps(forged).encode(), NOW)) == (
        "bad-signature")
    assert isinstance(v.check(subjects.vote(REPAIR, "riven"), genuine.to_bytes(), NOW), Accepted)


def test_replay_memory_is_bounded_by_the_freshness_window() -> None:
    v = verifier()
    for i in range(50):
        at = NOW + timedelta(seconds=i * 10)
        assert isinstance(v.check(subjects.vote(REPAIR, "riven"), vote(at=at).to_bytes(), at),
                          Accepted)
    assert len(v._seen) <= 7  # 2 x 30 s window / 10 s spacing, plus the current one


def test_heartbeat_subject_must_match_its_sender() -> None:
    body = Heartbeat(pid=1, version="0", tick=3, status="ok", bus="connected",
                     kubernetes="not observed", scopes_digest="a", policies_digest="b")
    data = seal("heartbeat", sender="otto", host="h", body=body, signer=OTTO, at=NOW).to_bytes()
    assert isinstance(verifier().check(subjects.heartbeat("otto"), data, NOW), Accepted)
    assert reason(verifier().check(subjects.heartbeat("riven"), data, NOW)) == "subject-mismatch"
    assert reason(verifier().check(subjects.finding("otto"), data, NOW)) == "subject-mismatch"


def test_seal_refuses_a_body_of_the_wrong_kind() -> None:
    body = Vote(verdict="approve", reason="r", observed_at=NOW, policy_digest="d")
    with pytest.raises(TypeError):
        seal("heartbeat", sender="otto", host="h", body=body, signer=OTTO)


@given(st.binary(max_size=300),
       st.sampled_from(["zeta.repair.x.vote.riven", "zeta.agent.otto.heartbeat",
                        "zeta.control.freeze", "nope"]))
def test_arbitrary_bytes_never_crash_the_verifier(data: bytes, subject: str) -> None:
    assert isinstance(verifier().check(subject, data, NOW), Dropped)
