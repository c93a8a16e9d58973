"""Which versions of a model should serve: a pure function of the policy, the disk and the states.

No I/O and no asyncio: the manager looks at the disk (`Disk`, one per version folder it has to
judge), passes the states of what it holds, applies the `Plan` and asks again after each load,
since a load that fails changes what the policy picks (Triton's model repository manager keeps
this apart from the per-version lifecycle in the same way).
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from bertstream.v1.model_config_pb2 import ModelVersionPolicy

from ..version_format import CONFIG_FILE
from .folders import select_versions
from .versions import State

__all__ = ["Disk", "Plan", "Settle", "plan", "reload_failures", "reload_todo", "settle"]


@dataclass(frozen=True)
class Disk:
    """What the manager saw in one version folder that is not READY or LOADING."""

    failed_unchanged: bool = False  # its last load failed; folder and config unchanged since
    missing: tuple[str, ...] = ()  # required files not there yet
    stable: bool = True  # stopped changing (poll mode); always True otherwise

    @property
    def loadable(self) -> bool:
        return not self.failed_unchanged and not self.missing and self.stable

    @property
    def waiting(self) -> str:
        """Why a folder that is not loadable waits ("" when it does not wait)."""
        if self.failed_unchanged or (not self.missing and self.stable):
            return ""
        why = f"{', '.join(self.missing)} missing" if self.missing else "still changing"
        return f"waiting for the folder to be complete: {why}"


@dataclass(frozen=True)
class Plan:
    """One step: versions to load now, and versions to show as waiting (with the reason)."""

    wanted: tuple[int, ...]
    load: tuple[int, ...]
    waiting: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Settle:
    """After the loads: versions to retire (with why), to forget, and the model's error."""

    retire: Mapping[int, str] = field(default_factory=dict)
    forget: tuple[int, ...] = ()
    error: str = ""


def candidates(on_disk: Set[int], states: Mapping[int, State],
               disk: Mapping[int, Disk]) -> tuple[list[int], dict[int, str]]:
    """Versions that can serve (READY, LOADING, or a loadable folder), and the waiting ones:
    a folder not yet complete or stable that has never loaded (UNKNOWN or new)."""
    usable, waiting = [], {}
    for version in sorted(on_disk):
        state = states.get(version)
        if state in (State.READY, State.LOADING):
            usable.append(version)
            continue
        look = disk.get(version, Disk())
        if look.loadable:
            usable.append(version)
        elif look.waiting and state in (None, State.UNKNOWN):
            waiting[version] = look.waiting
    return usable, waiting


def plan(policy: ModelVersionPolicy, on_disk: Set[int], states: Mapping[int, State],
         disk: Mapping[int, Disk], tried: Set[int] = frozenset()) -> Plan:
    """The policy's versions among those that can serve; load those not READY and not tried
    in this round (a failed load is not tried twice in one sync)."""
    usable, waiting = candidates(on_disk, states, disk)
    wanted = select_versions(policy, usable)
    load = [v for v in wanted if v not in tried and states.get(v) is not State.READY]
    return Plan(tuple(wanted), tuple(load), waiting)


def settle(wanted: tuple[int, ...], on_disk: Set[int], states: Mapping[int, State]) -> Settle:
    """Retire READY versions the policy no longer serves, but only once one it serves is READY
    (or the folder is gone): a broken new version never takes a good one's place."""
    ready_wanted = [v for v in wanted if states.get(v) is State.READY]
    retire, forget, error = {}, [], ""
    for version, state in sorted(states.items()):
        if state is State.READY and version not in wanted:
            if version not in on_disk:
                retire[version] = "removed from the repository"
            elif ready_wanted:
                retire[version] = f"the version policy now serves {ready_wanted}"
            else:
                error = (f"the version policy serves {list(wanted) or 'no version'}, and none "
                         f"of them loads; still serving version {version}")
        elif state not in (State.READY, State.UNLOADING) and version not in on_disk:
            forget.append(version)  # gone from disk and not serving
    return Settle(retire, tuple(forget), error)


def reload_todo(policy: ModelVersionPolicy, usable: list[int],
                fresh: Mapping[int, State]) -> list[int]:
    """A config change: the versions to load (next) with the new config. `usable` are the
    serving versions and the loadable folders; `fresh` the reloads done so far."""
    keep = [v for v in usable if v not in fresh or fresh[v] is State.READY]
    return [v for v in select_versions(policy, keep) if v not in fresh]


def reload_failures(serving: Set[int], fresh: Mapping[int, tuple[State, str]]) -> str:
    """Why a config change must not switch ("" when it may): every serving version it keeps
    must have loaded with it, and at least one version must have."""
    ready = {v for v, (state, _) in fresh.items() if state is State.READY}
    broken = {v: why for v, (state, why) in fresh.items() if v in serving and v not in ready}
    if not broken and ready:
        return ""
    failures = "; ".join(f"version {v}: {why}" for v, why in
                         (broken or {v: why for v, (_, why) in fresh.items()}).items())
    return (f"{CONFIG_FILE} changed but the served versions do not all load with it "
            f"({failures or 'no complete version'}); still serving the previous config")
