"""The supervisor's decisions (pure: observations and a fake clock in, actions out) and its argv/config parsing."""

from __future__ import annotations

import pytest

from core.errors import BadParameterError
from core.supervisor import (
    GiveUp,
    ModelObservation,
    Restart,
    SupervisionLogic,
    SupervisorPolicy,
    expected_stubs,
    stub_identity,
)

READY = ModelObservation("m", "READY", ready=True)
DEAD = ModelObservation("m", "READY", ready=True, missing_stubs=("m_0_0",))


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def advance(self, seconds: float) -> float:
        self.now_s += seconds
        return self.now_s


def crash(logic: SupervisionLogic, clock: FakeClock, polls: int = 2) -> list:
    """Show ``polls`` looks at a dead stub, 0.5 s apart; the actions of the last one."""
    actions = []
    for _ in range(polls):
        actions = logic.observe([DEAD], clock.advance(0.5))
    return actions


def test_logic_restarts_when_a_stub_is_gone_on_two_looks_in_a_row():
    logic, clock = SupervisionLogic(), FakeClock()
    assert logic.observe([READY], clock.now_s) == []
    assert logic.observe([DEAD], clock.advance(0.5)) == []  # one look may race someone's reload
    (action,) = logic.observe([DEAD], clock.advance(0.5))
    assert action == Restart("m", "stub process m_0_0 is gone", 1)


def test_logic_forgets_a_single_bad_look():
    logic, clock = SupervisionLogic(), FakeClock()
    logic.observe([DEAD], clock.now_s)
    logic.observe([READY], clock.advance(0.5))
    assert logic.observe([DEAD], clock.advance(0.5)) == []


def test_logic_restarts_when_the_health_probe_fails():
    logic, clock = SupervisionLogic(SupervisorPolicy(confirm_polls=1)), FakeClock()
    (action,) = logic.observe([ModelObservation("m", "READY", ready=False)], clock.now_s)
    assert isinstance(action, Restart) and "health probe" in action.reason


def test_logic_gives_up_after_three_restarts_within_the_window():
    logic, clock = SupervisionLogic(SupervisorPolicy(max_restarts=3, crash_window_s=60)), FakeClock()
    counts = []
    for _ in range(3):
        (action,) = crash(logic, clock)
        counts.append(action.count)
        clock.advance(10)
    assert counts == [1, 2, 3]
    (action,) = crash(logic, clock)
    assert isinstance(action, GiveUp) and action.count == 3
    assert logic.gave_up("m") and "m" not in logic.watched


def test_logic_restarts_again_once_old_restarts_leave_the_window():
    logic, clock = SupervisionLogic(SupervisorPolicy(max_restarts=3, crash_window_s=60)), FakeClock()
    for _ in range(3):
        crash(logic, clock)
        clock.advance(25)  # 3 restarts over ~76 s: the first is out of the window by the fourth crash
    (action,) = crash(logic, clock)
    assert isinstance(action, Restart) and action.count == 3


def test_logic_leaves_a_model_unloaded_on_purpose_alone():
    logic, clock = SupervisionLogic(), FakeClock()
    logic.observe([READY], clock.now_s)
    for _ in range(3):
        assert logic.observe([ModelObservation("m", "UNAVAILABLE", "unloaded")], clock.advance(0.5)) == []
    assert "m" not in logic.watched


def test_logic_restarts_a_watched_model_that_became_unavailable_for_an_error():
    logic, clock = SupervisionLogic(), FakeClock()
    logic.observe([READY], clock.now_s)
    failed = ModelObservation("m", "UNAVAILABLE", "load failed: out of memory")
    logic.observe([failed], clock.advance(0.5))
    (action,) = logic.observe([failed], clock.advance(0.5))
    assert isinstance(action, Restart) and "out of memory" in action.reason


def test_logic_ignores_models_never_seen_ready_and_models_being_loaded():
    logic, clock = SupervisionLogic(SupervisorPolicy(confirm_polls=1)), FakeClock()
    assert logic.observe([ModelObservation("m", "UNAVAILABLE", "bad config")], clock.now_s) == []
    logic.observe([READY], clock.advance(0.5))
    assert logic.observe([ModelObservation("m", "LOADING")], clock.advance(0.5)) == []


def test_logic_watches_only_the_models_it_is_given():
    logic, clock = SupervisionLogic(SupervisorPolicy(confirm_polls=1), models=["other"]), FakeClock()
    assert logic.observe([DEAD], clock.now_s) == []


def test_logic_watches_a_given_up_model_again_once_someone_loads_it():
    logic, clock = SupervisionLogic(SupervisorPolicy(max_restarts=0)), FakeClock()
    (action,) = crash(logic, clock)
    assert isinstance(action, GiveUp)
    logic.observe([ModelObservation("m", "UNAVAILABLE", "unloaded")], clock.advance(0.5))
    logic.observe([READY], clock.advance(0.5))
    assert not logic.gave_up("m") and "m" in logic.watched


@pytest.mark.parametrize("field, value", [("poll_interval_s", 0), ("confirm_polls", 0), ("max_restarts", -1),
                                          ("crash_window_s", 0)])
def test_policy_refuses_bad_values(field, value):
    with pytest.raises(BadParameterError, match=field):
        SupervisorPolicy(**{field: value})


def test_stub_identity_reads_model_and_instance_from_the_stub_argv():
    argv = ["/x/backends/python/triton_python_backend_stub", "/repo/bert_base_stage1/1/model.py", "shm", "1048576",
            "1048576", "42", "/x/backends/python", "336", "bert_base_stage1_0_0", "DEFAULT"]
    assert stub_identity(argv) == ("bert_base_stage1", "bert_base_stage1_0_0")
    assert stub_identity(["/usr/bin/python3", "x.py"]) is None
    assert stub_identity([]) is None


def test_expected_stubs_come_from_python_instance_groups_only():
    python = {"backend": "python", "instance_group": [{"name": "m_0", "count": 2}, {"name": "m_1", "count": 1}]}
    assert expected_stubs(python) == ("m_0_0", "m_0_1", "m_1_0")
    assert expected_stubs({"backend": "onnxruntime", "instance_group": [{"name": "m_0", "count": 1}]}) == ()
    assert expected_stubs({"platform": "ensemble"}) == ()


def test_logic_does_not_count_a_probe_without_answer_as_a_failure():
    logic, clock = SupervisionLogic(SupervisorPolicy(confirm_polls=1)), FakeClock()
    busy = ModelObservation("m", "READY", ready=None)  # a server too busy to answer in time
    assert [logic.observe([busy], clock.advance(0.5)) for _ in range(3)] == [[], [], []]
