"""Pauses (issue 15, part 3): which signed pause and resume controls hold a policy now.

The state must not depend on the order the controls arrive in (a delayed or replayed
one is ordered by its signed time), and a pause past its ``until`` holds nothing.
The agents holding a real repair under a pause that then lapses is
tests/test_fleet_degraded.py::test_a_pause_holds_repairs_then_lapses_by_itself.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from bus.messages import Control
from runtime.agent.link import ALL_POLICIES, Pauses

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def pause(policy: str | None, at: float, hours: float = 1) -> tuple[Control, datetime]:
    return (Control(verb="pause", reason="r", policy=policy,
                    until=T0 + timedelta(seconds=at, hours=hours)), T0 + timedelta(seconds=at))


def resume(policy: str | None, at: float) -> tuple[Control, datetime]:
    return Control(verb="resume", reason="r", policy=policy), T0 + timedelta(seconds=at)


def state(controls: list[tuple[Control, datetime]]) -> Pauses:
    pauses = Pauses()
    for index, (control, at) in enumerate(controls):
        pauses.apply(control, by="alice", at=at, id=f"{at.timestamp():020.3f}{index:04d}")
    return pauses


def held(pauses: Pauses, policy: str, seconds: float = 100) -> bool:
    return pauses.holding(policy, T0 + timedelta(seconds=seconds)) is not None


def test_a_pause_holds_its_policy_or_every_policy_until_it_lapses() -> None:
    one = state([pause("node-not-ready", 0)])
    assert held(one, "node-not-ready")
    assert not held(one, "pod-crashloop")
    assert not held(one, "node-not-ready", seconds=3601), "lapsed by itself"
    every = state([pause(None, 0)])
    assert held(every, "pod-crashloop")
    assert [p.scope for p in every.active(T0)] == [ALL_POLICIES]


def test_a_resume_lifts_older_pauses_only() -> None:
    assert not held(state([pause("a", 0), resume("a", 10)]), "a")
    assert not held(state([pause("a", 0), resume(None, 10)]), "a"), "--all lifts every pause"
    assert held(state([pause("a", 0), resume("b", 10)]), "a")
    assert held(state([pause("a", 20), resume("a", 10)]), "a"), "an older resume lifts nothing"
    assert not held(state([resume("a", 10), pause("a", 0)]), "a"), (
        "a delayed pause older than the resume stays lifted")


controls = st.lists(st.tuples(st.sampled_from(["pause", "resume"]),
                              st.sampled_from([None, "a", "b"]),
                              st.integers(min_value=0, max_value=50)), max_size=8, unique_by=
                    lambda c: c[2])


@given(controls, st.randoms())
def test_the_state_does_not_depend_on_arrival_order(
        steps: list[tuple[str, str | None, int]], shuffle: random.Random) -> None:
    made = [pause(p, at) if verb == "pause" else resume(p, at) for verb, p, at in steps]
    ids = {id(c): f"{at.timestamp():020.3f}" for c, at in made}
    in_order, arrived = Pauses(), Pauses()
    for control, at in sorted(made, key=lambda c: c[1]):
        in_order.apply(control, by="alice", at=at, id=ids[id(control)])
    shuffled = list(made)
    shuffle.shuffle(shuffled)
    for control, at in shuffled:
        arrived.apply(control, by="alice", at=at, id=ids[id(control)])
    now = T0 + timedelta(seconds=60)
    assert [p.scope for p in in_order.active(now)] == [p.scope for p in arrived.active(now)]
