"""The planner: which versions to load, retire, forget or leave waiting, as tables."""

from __future__ import annotations

import pytest
from bertstream.server.repository.planner import Disk, plan, reload_failures, reload_todo, settle
from bertstream.server.repository.versions import State
from bertstream.v1.model_config_pb2 import ModelVersionPolicy

R, L, U, N, X = State.READY, State.LOADING, State.UNKNOWN, State.UNLOADING, State.UNAVAILABLE


def _policy(kind: str, arg: object = None) -> ModelVersionPolicy:
    policy = ModelVersionPolicy()
    if kind == "latest":
        policy.latest.num_versions = arg  # type: ignore[assignment]
    elif kind == "all":
        policy.all.SetInParent()
    else:
        policy.specific.versions.extend(arg)  # type: ignore[arg-type]
    return policy


GONE = Disk(failed_unchanged=True)
HALF = Disk(missing=("tokenizer.json",))
MOVING = Disk(stable=False)

PLANS = [
    # (case, policy, on disk, states, disk looks, tried) -> (wanted, load, waiting)
    ("first start", _policy("latest", 1), {1, 2}, {}, {}, set(), (2,), (2,), {}),
    ("v2 is new beside v1", _policy("latest", 1), {1, 2}, {1: R}, {}, set(), (2,), (2,), {}),
    ("nothing to do", _policy("latest", 1), {1, 2}, {2: R}, {}, set(), (2,), (), {}),
    ("a failure unchanged keeps v1", _policy("latest", 1), {1, 2}, {1: R, 2: X}, {2: GONE},
     set(), (1,), (), {}),
    ("a failed folder that changed is retried", _policy("latest", 1), {1, 2}, {1: R, 2: X},
     {}, set(), (2,), (2,), {}),
    ("tried once this round", _policy("latest", 1), {1, 2}, {1: R, 2: X}, {}, {2}, (2,), (), {}),
    ("half copied waits", _policy("latest", 1), {1, 2}, {1: R}, {2: HALF}, set(), (1,), (),
     {2: "waiting for the folder to be complete: tokenizer.json missing"}),
    ("still changing waits", _policy("latest", 1), {1, 2}, {1: R, 2: U}, {2: MOVING}, set(),
     (1,), (), {2: "waiting for the folder to be complete: still changing"}),
    ("a failed one does not turn waiting", _policy("latest", 1), {1, 2}, {1: R, 2: X},
     {2: MOVING}, set(), (1,), (), {}),
    ("latest 2", _policy("latest", 2), {1, 2, 3}, {1: R}, {}, set(), (2, 3), (2, 3), {}),
    ("all", _policy("all"), {1, 3}, {}, {}, set(), (1, 3), (1, 3), {}),
    ("specific", _policy("specific", [1, 5]), {1, 2, 5}, {}, {}, set(), (1, 5), (1, 5), {}),
    ("loading counts as usable", _policy("latest", 1), {1, 2}, {2: L}, {}, set(), (2,), (2,),
     {}),
]


@pytest.mark.parametrize(("policy", "on_disk", "states", "disk", "tried", "wanted", "load",
                          "waiting"), [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
def test_plan(policy: ModelVersionPolicy, on_disk: set[int], states: dict[int, State],
              disk: dict[int, Disk], tried: set[int], wanted: tuple[int, ...],
              load: tuple[int, ...], waiting: dict[int, str]) -> None:
    step = plan(policy, on_disk, states, disk, tried)
    assert (step.wanted, step.load, dict(step.waiting)) == (wanted, load, waiting)


SETTLES = [
    # (case, wanted, on disk, states) -> (retire, forget, error words)
    ("swap done", (2,), {1, 2}, {1: R, 2: R},
     {1: "the version policy now serves [2]"}, (), ""),
    ("new one broken: old keeps serving", (2,), {1, 2}, {1: R, 2: X}, {}, (),
     "none of them loads; still serving version 1"),
    ("folder removed", (2,), {2}, {1: R, 2: R}, {1: "removed from the repository"}, (), ""),
    ("serving folder removed, nothing else", (), set(), {1: R},
     {1: "removed from the repository"}, (), ""),
    ("forget what is gone and idle", (2,), {2}, {1: X, 3: U, 2: R}, {}, (1, 3), ""),
    ("a draining version stays", (2,), {2}, {1: N, 2: R}, {}, (), ""),
]


@pytest.mark.parametrize(("wanted", "on_disk", "states", "retire", "forget", "error"),
                         [s[1:] for s in SETTLES], ids=[s[0] for s in SETTLES])
def test_settle(wanted: tuple[int, ...], on_disk: set[int], states: dict[int, State],
                retire: dict[int, str], forget: tuple[int, ...], error: str) -> None:
    done = settle(wanted, on_disk, states)
    assert dict(done.retire) == retire and done.forget == forget
    assert (error in done.error) if error else done.error == ""


RELOADS = [
    # (case, policy, usable, fresh so far) -> next versions to load
    ("start", _policy("latest", 1), [1, 2], {}, [2]),
    ("the new one failed: fall back", _policy("latest", 1), [1, 2], {2: X}, [1]),
    ("done", _policy("latest", 1), [1, 2], {2: R}, []),
    ("all, one failed", _policy("all"), [1, 2], {1: R, 2: X}, []),
]


@pytest.mark.parametrize(("policy", "usable", "fresh", "todo"), [r[1:] for r in RELOADS],
                         ids=[r[0] for r in RELOADS])
def test_reload_todo(policy: ModelVersionPolicy, usable: list[int], fresh: dict[int, State],
                     todo: list[int]) -> None:
    assert reload_todo(policy, usable, fresh) == todo


@pytest.mark.parametrize(("serving", "fresh", "words"), [
    ({1}, {1: (R, "")}, ""),
    ({1}, {2: (R, ""), 1: (X, "load failed: bad")}, "version 1: load failed: bad"),
    ({1}, {2: (R, "")}, ""),  # the new policy drops version 1: not required
    ({1}, {1: (X, "load failed: x")}, "version 1: load failed: x"),
    ({1}, {}, "no complete version"),
])
def test_reload_is_all_or_nothing(serving: set[int], fresh: dict[int, tuple[State, str]],
                                  words: str) -> None:
    failure = reload_failures(serving, fresh)
    if words:
        assert words in failure and "still serving the previous config" in failure
    else:
        assert failure == ""
