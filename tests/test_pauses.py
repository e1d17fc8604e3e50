"""Pauses (issue 15, part 3): which signed pause and resume controls hold a policy now.

The state must not depend on the order the controls arrive in (a delayed or replayed
one is ordered by its signed time), and a pause past its ``until`` holds nothing.
The agents holding a real repair under a pause that then lapses is
tests/test_fleet_degraded.py::test_a_pause_holds_repairs_then_lapses_by_itself.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from bus.messages import Control, Target
from runtime.agent.execution import Execution
from runtime.agent.link import ALL_POLICIES, Pauses
from runtime.agent.metrics import Metrics
from runtime.agent.observing import Observing
from runtime.core.engine import PolicyEngine
from runtime.core.ports import Actuators
from runtime.model.formats import MaintenanceWindow
from runtime.ops.cli import main
from tests.builders import intent, persona

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


# ---------------------------------------------------------------- maintenance windows


def window(**fields: object) -> MaintenanceWindow:
    return MaintenanceWindow.model_validate({"name": "kernel", "schedule": "0 2 * * 6",
                                             "duration": "2h", "timeZone": "Europe/Berlin",
                                             **fields})


def test_a_window_is_open_from_its_local_start_for_its_duration() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    saturday = datetime(2026, 12, 5, 2, 30, tzinfo=berlin)  # 01:30 UTC
    assert window().closes(saturday) == datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
    assert window().closes(datetime(2026, 12, 5, 4, 0, tzinfo=berlin)) is None, "closed at 4"
    assert window().closes(datetime(2026, 12, 5, 1, 59, tzinfo=berlin)) is None
    assert window().closes(datetime(2026, 12, 4, 2, 30, tzinfo=berlin)) is None, "a Friday"
    # Summer time: still 02:00 in Berlin, which is 00:00 UTC.
    july = datetime(2026, 7, 4, 0, 30, tzinfo=UTC)
    assert window().closes(july) == datetime(2026, 7, 4, 2, 0, tzinfo=UTC)


def test_a_window_holds_its_policies_or_all() -> None:
    assert window().holds("anything")
    only = window(policies=["node-not-ready"])
    assert only.holds("node-not-ready")
    assert not only.holds("pod-crashloop")


@pytest.mark.parametrize(("fields", "message"), [
    ({"schedule": "0 2 * *"}, "expected 5 cron fields"),
    ({"schedule": "61 2 * * 6"}, "not a cron expression"),
    ({"timeZone": "Mars/Olympus"}, "is not an IANA time zone"),
    ({"duration": "30s"}, "must be between 1m and 7d"),
])
def test_a_window_that_cannot_work_is_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        window(**fields)


def test_validate_refuses_a_window_on_an_unknown_policy(
        config_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (config_copy / "fleet.yaml").write_text(
        "apiVersion: zeta/v1\nkind: Fleet\nspec:\n  maintenanceWindows:\n"
        "    - {name: kernel, schedule: '0 2 * * 6', duration: 2h,\n"
        "       policies: [node-not-redy]}\n")
    assert main(["validate", str(config_copy)]) == 1
    assert ("fleet.yaml:6: spec.maintenanceWindows[0].policies[0]: no RepairPolicy named "
            "'node-not-redy'") in capsys.readouterr().err


def test_repairs_are_held_inside_a_window_only_and_compensations_never() -> None:
    now = [datetime(2026, 12, 5, 1, 30, tzinfo=UTC)]  # 02:30 in Berlin, a Saturday
    execution = Execution(persona(), engine=cast(PolicyEngine, None),
                          actuators=Actuators({}), observing=cast(Observing, None), link=None,
                          metrics=Metrics("otto"), wall=lambda: now[0],
                          tick=timedelta(seconds=1), windows=[window()])
    cordon = intent("k8s.node.cordon", Target(kind="node", name="worker-1"))
    assert execution.paused(cordon) == (
        "maintenance window kernel until 2026-12-05T03:00:00.000Z")
    assert execution.paused(intent("k8s.node.uncordon",
                                   Target(kind="node", name="worker-1"))) is None
    now[0] = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
    assert execution.paused(cordon) is None, "closed"
