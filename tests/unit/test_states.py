"""The version state machine: every allowed transition works, every other one raises."""

import pytest
from bertstream.server.repository.versions import TRANSITIONS, ModelVersion, State


@pytest.mark.parametrize("start", list(State))
@pytest.mark.parametrize("end", list(State))
def test_transition_table(start: State, end: State, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mv = ModelVersion("m", 1, tmp_path, state=start)
    if end in TRANSITIONS[start]:
        mv.transition(end, "why")
        assert (mv.state, mv.reason) == (end, "why")
    else:
        with pytest.raises(RuntimeError):
            mv.transition(end)
        assert mv.state is start
