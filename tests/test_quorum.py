"""The quorum tally, tried exhaustively: nothing destructive is approved without a real quorum."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from bus.quorum import Ballot, Rule, counted_ballots, tally

T0 = datetime(2026, 11, 27, 6, 0, tzinfo=UTC)
PERSONAS = ("otto", "alexa", "riven", "vera", "lior", "nova")
ELIGIBLE = frozenset(PERSONAS[:5])


def rule(approvals: int = 3, veto: frozenset[str] = frozenset({"riven"})) -> Rule:
    return Rule(proposer="otto", approvals=approvals, veto=veto,
                deadline=T0 + timedelta(seconds=30))


def ballot(voter: str, verdict: str = "approve", seconds: float = 1, vid: str = "") -> Ballot:
    return Ballot(vid or f"v-{voter}-{seconds}", voter, verdict, T0 + timedelta(seconds=seconds))  # type: ignore[arg-type]


def test_approved_with_enough_distinct_approvals_and_the_veto_holder_heard() -> None:
    votes = [ballot("alexa"), ballot("riven")]
    result = tally(rule(), votes, ELIGIBLE, T0 + timedelta(seconds=2))
    assert result.outcome == "approved"
    assert set(result.approvals) == {"otto", "alexa", "riven"}
    assert set(result.counted) == {"v-alexa-1", "v-riven-1"}


def test_veto_rejects_even_with_every_other_approval() -> None:
    votes = [ballot("alexa"), ballot("vera"), ballot("lior"), ballot("riven", "block")]
    result = tally(rule(), votes, ELIGIBLE, T0 + timedelta(seconds=2))
    assert result.outcome == "rejected"
    assert result.vetoes == ("riven",)


def test_waits_for_the_veto_holder_then_expires_without_her() -> None:
    votes = [ballot("alexa"), ballot("vera"), ballot("lior")]
    assert tally(rule(), votes, ELIGIBLE, T0 + timedelta(seconds=5)).outcome == "pending"
    late = tally(rule(), votes, ELIGIBLE, T0 + timedelta(seconds=31))
    assert late.outcome == "expired"
    assert "riven" in late.reason


def test_proposer_counts_once_and_cannot_vote_for_itself() -> None:
    votes = [ballot("otto", vid="a"), ballot("otto", seconds=2, vid="b"), ballot("riven")]
    result = tally(rule(), votes, ELIGIBLE, T0 + timedelta(seconds=3))
    assert result.approvals == ("otto", "riven")
    assert result.outcome == "pending"


def test_duplicate_votes_do_not_inflate_and_the_first_vote_stands() -> None:
    votes = [ballot("alexa", "reject", 1), ballot("alexa", "approve", 2), ballot("riven")]
    result = tally(rule(approvals=2), votes, ELIGIBLE, T0 + timedelta(seconds=3))
    assert result.rejections == ("alexa",)
    assert result.approvals == ("otto", "riven")


def test_ineligible_and_late_votes_are_ignored() -> None:
    votes = [ballot("nova"), ballot("alexa", seconds=31), ballot("riven")]
    result = tally(rule(), votes, ELIGIBLE, T0 + timedelta(seconds=32))
    assert result.outcome == "expired"
    assert result.approvals == ("otto", "riven")


def test_rejected_early_when_the_remaining_voters_cannot_reach_the_quorum() -> None:
    votes = [ballot("alexa", "reject"), ballot("vera", "reject"), ballot("lior", "reject")]
    result = tally(rule(), votes, ELIGIBLE, T0 + timedelta(seconds=2))
    assert result.outcome == "rejected"


def test_block_from_a_non_veto_persona_is_a_rejection_not_a_veto() -> None:
    votes = [ballot("alexa", "block"), ballot("vera"), ballot("riven")]
    result = tally(rule(), votes, ELIGIBLE, T0 + timedelta(seconds=2))
    assert result.outcome == "approved"
    assert result.rejections == ("alexa",)
    assert result.vetoes == ()


ballots = st.lists(
    st.builds(
        Ballot,
        vote_id=st.text("abcdef0123", min_size=1, max_size=6),
        voter=st.sampled_from(PERSONAS),
        verdict=st.sampled_from(["approve", "reject", "block"]),
        at=st.integers(0, 40).map(lambda s: T0 + timedelta(seconds=s)),
    ),
    max_size=12,
)


@given(ballots, st.integers(1, 6), st.frozensets(st.sampled_from(PERSONAS), max_size=2),
       st.integers(0, 45))
def test_an_approval_always_has_a_real_quorum(
    votes: list[Ballot], approvals: int, veto: frozenset[str], now_s: int
) -> None:
    r = rule(approvals, veto)
    result = tally(r, votes, ELIGIBLE, T0 + timedelta(seconds=now_s))
    if result.outcome != "approved":
        return
    counted = counted_ballots(r, votes, ELIGIBLE)
    approvers = {"otto"} | {b.voter for b in counted if b.verdict == "approve"}
    assert len(approvers) >= approvals
    assert len(set(result.approvals)) == len(result.approvals)
    assert all(b.at <= r.deadline and b.voter in ELIGIBLE for b in counted)
    heard = {b.voter for b in counted}
    for holder in (veto & ELIGIBLE) - {"otto"}:
        assert holder in heard, "approved without hearing a veto holder"
        assert not any(b.voter == holder and b.verdict == "block" for b in counted)


@given(ballots, st.integers(1, 6), st.randoms())
def test_arrival_order_does_not_matter(votes: list[Ballot], approvals: int, rnd: object) -> None:
    shuffled = list(votes)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    now = T0 + timedelta(seconds=20)
    assert tally(rule(approvals), votes, ELIGIBLE, now) == tally(rule(approvals), shuffled,
                                                                  ELIGIBLE, now)


@given(ballots, st.integers(1, 6))
def test_more_time_never_turns_a_final_decision_back(votes: list[Ballot], approvals: int) -> None:
    early = tally(rule(approvals), votes, ELIGIBLE, T0 + timedelta(seconds=10))
    late = tally(rule(approvals), votes, ELIGIBLE, T0 + timedelta(seconds=60))
    if early.final:
        assert late.outcome == early.outcome
    assert late.final
