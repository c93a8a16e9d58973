"""The model manager in-process, against a fake loader whose loads and warm-ups are gated by
events: the swap rules of tests/lifecycle without a server, an export or a sleep."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from bertstream.server.engine.interface import Loaded
from bertstream.server.errors import LoadFailed, ModelNotFound, ModelNotReady
from bertstream.server.repository import folders
from bertstream.server.repository.manager import ModelManager
from bertstream.server.repository.snapshot import wire_state
from bertstream.server.repository.versions import State
from bertstream.server.version_format import CONFIG_FILE, required_files
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1.model_config_pb2 import ModelConfig

CONFIG = "task: TASK_EMBED embedding_dimension: 8 num_layers: 1 max_sequence_length: 16\n"
FAIL = "fail"  # a file in a version folder the fake loader refuses to load
WIDTH = "width"  # the embedding_dimension a version was made for (the fake checks it)


class FakeBatcher:
    queued = 0

    def queued_at(self, level: int) -> int:
        return 0

    async def close(self) -> None:
        return None


class FakeLoader:
    """Loads from any folder; `gate(model, version)` holds its build (or warm-up) until set."""

    def __init__(self) -> None:
        self.build_gates: dict[tuple[str, int], asyncio.Event] = {}
        self.warm_gates: dict[tuple[str, int], asyncio.Event] = {}
        self.started: dict[tuple[str, int], asyncio.Event] = {}
        self.warming: dict[tuple[str, int], asyncio.Event] = {}
        self.built: list[tuple[str, int]] = []
        self.released: list[tuple[str, int]] = []

    def reached(self, model: str, version: int) -> asyncio.Event:
        return self.started.setdefault((model, version), asyncio.Event())

    async def build(self, model: str, version: int, path: Path, config: ModelConfig) -> Loaded:
        self.built.append((model, version))
        self.reached(model, version).set()
        if gate := self.build_gates.get((model, version)):
            await gate.wait()
        if (path / FAIL).exists():
            raise ValueError((path / FAIL).read_text())
        if (path / WIDTH).exists() and int((path / WIDTH).read_text()) != \
                config.embedding_dimension:
            raise ValueError(f"has size {(path / WIDTH).read_text()}, {CONFIG_FILE} says "
                             f"{config.embedding_dimension}")
        loaded = Loaded(config, None, FakeBatcher(), [], "fake")
        loaded.key = (model, version)  # type: ignore[attr-defined]
        return loaded

    async def warm_up(self, loaded: Loaded) -> None:
        self.warming.setdefault(loaded.key, asyncio.Event()).set()  # type: ignore[attr-defined]
        if gate := self.warm_gates.get(loaded.key):  # type: ignore[attr-defined]
            await gate.wait()

    async def release(self, loaded: Loaded, trim: bool) -> None:
        self.released.append(loaded.key)  # type: ignore[attr-defined]


def _version(model_dir: Path, version: int | str, *extra: tuple[str, str]) -> Path:
    folder = model_dir / str(version)
    folder.mkdir(parents=True)
    config = folders.read_model(model_dir.parent, model_dir).config
    for name in required_files(config or ModelConfig()):
        (folder / name).write_text("x")
    for name, text in extra:
        (folder / name).write_text(text)
    return folder


def _model(root: Path, name: str, versions: list[int], config: str = CONFIG) -> Path:
    model_dir = root / name
    model_dir.mkdir(parents=True)
    (model_dir / CONFIG_FILE).write_text(config)
    for version in versions:
        _version(model_dir, version)
    return model_dir


def _run(test: Callable[[Path], Awaitable[None]]) -> Callable[[Path], None]:
    """Run an async test on a fresh loop; no plugin needed."""
    def run(tmp_path: Path) -> None:
        asyncio.run(asyncio.wait_for(test(tmp_path), 10))
    run.__name__ = test.__name__
    return run


def _rows(manager: ModelManager, name: str) -> dict[int, tuple[State, str]]:
    row = manager.snapshot.model(name)
    assert row is not None
    return {v.version: (v.state, v.reason) for v in row.versions}


def _manager(root: Path, **kwargs: Any) -> tuple[ModelManager, FakeLoader]:
    loader = FakeLoader()
    return ModelManager(root, loader, **kwargs), loader


async def _sync(manager: ModelManager, **kwargs: Any) -> None:
    await manager.sync(folders.scan(manager.root), **kwargs)


@_run
async def test_v1_serves_while_a_slow_v2_loads_and_warms_up(tmp_path: Path) -> None:
    model_dir = _model(tmp_path, "m", [1])
    manager, loader = _manager(tmp_path)
    await manager.load_all()
    assert manager.resolve("m", 0).version == 1 and manager.snapshot.default_model == "m"
    _version(model_dir, 2)
    loader.build_gates[("m", 2)] = build = asyncio.Event()
    loader.warm_gates[("m", 2)] = warm = asyncio.Event()
    syncing = asyncio.create_task(_sync(manager))
    await loader.reached("m", 2).wait()
    with manager.lease("m", 0) as mv:  # requests keep going to version 1
        assert mv.version == 1
    build.set()
    await loader.warming.setdefault(("m", 2), asyncio.Event()).wait()
    # Built, warming up: still not routable.
    assert manager.resolve("m", 0).version == 1
    assert manager.snapshot.ready_versions("m") == (1,)
    warm.set()
    await syncing
    assert manager.resolve("m", 0).version == 2
    state, reason = _rows(manager, "m")[1]
    assert state in (State.UNLOADING, State.UNAVAILABLE)
    assert reason.endswith("the version policy now serves [2]")
    await manager.drained()
    assert _rows(manager, "m")[1][0] is State.UNAVAILABLE and loader.released == [("m", 1)]


@_run
async def test_a_failed_load_keeps_v1_and_is_retried_only_when_its_folder_changes(
        tmp_path: Path) -> None:
    model_dir = _model(tmp_path, "m", [1])
    manager, loader = _manager(tmp_path)
    await manager.load_all()
    broken = _version(model_dir, 2, (FAIL, "corrupt graph"))
    await _sync(manager)
    rows = _rows(manager, "m")
    assert rows[2] == (State.UNAVAILABLE, "load failed: corrupt graph")
    assert rows[1][0] is State.READY and manager.resolve("m", 0).version == 1
    await _sync(manager)
    assert loader.built.count(("m", 2)) == 1, "an unchanged failure is not tried again"
    (broken / FAIL).unlink()
    await _sync(manager)
    assert manager.resolve("m", 0).version == 2 and loader.built.count(("m", 2)) == 2


@_run
async def test_an_unparsable_config_keeps_the_serving_version(tmp_path: Path) -> None:
    model_dir = _model(tmp_path, "m", [1])
    manager, _ = _manager(tmp_path)
    await manager.load_all()
    (model_dir / CONFIG_FILE).write_text("max_batch_size: [not a number\n")
    with pytest.raises(LoadFailed, match="does not parse"):
        await manager.load_model("m")
    error = manager.snapshot.model("m").error
    assert "does not parse" in error and "still serving versions [1]" in error
    assert manager.resolve("m", 0).version == 1


@_run
async def test_versions_named_01_or_abc_are_not_versions(tmp_path: Path) -> None:
    model_dir = _model(tmp_path, "m", [1])
    for name in ("01", "abc", ".3-staging"):
        _version(model_dir, name)
    manager, loader = _manager(tmp_path)
    await manager.load_all()
    assert set(_rows(manager, "m")) == {1} and loader.built == [("m", 1)]


@_run
async def test_a_half_copied_folder_waits(tmp_path: Path) -> None:
    model_dir = _model(tmp_path, "m", [1])
    manager, loader = _manager(tmp_path)
    await manager.load_all()
    half = _version(model_dir, 2)
    (half / "tokenizer.json").unlink()
    await _sync(manager, stable=lambda path: True)
    state, reason = _rows(manager, "m")[2]
    assert state is State.UNKNOWN and "tokenizer.json missing" in reason
    (half / "tokenizer.json").write_text("x")
    await _sync(manager, stable=lambda path: path != half)
    assert _rows(manager, "m")[2] == (
        State.UNKNOWN, "waiting for the folder to be complete: still changing")
    assert ("m", 2) not in loader.built and manager.resolve("m", 0).version == 1
    await _sync(manager, stable=lambda path: True)
    assert manager.resolve("m", 0).version == 2


@_run
async def test_unload_waits_for_leases(tmp_path: Path) -> None:
    _model(tmp_path, "m", [1])
    manager, loader = _manager(tmp_path)
    await manager.load_model("m")
    with manager.lease("m", 0):
        await manager.unload_model("m")
        assert _rows(manager, "m")[1][0] is State.UNLOADING
        with pytest.raises(ModelNotReady, match="unloaded by UnloadModel"):
            manager.resolve("m", 0)
        await asyncio.sleep(0)
        assert loader.released == [], "released under a running request"
    await manager.drained()
    assert loader.released == [("m", 1)] and _rows(manager, "m")[1][0] is State.UNAVAILABLE


@_run
async def test_explicit_load_and_unload(tmp_path: Path) -> None:
    _model(tmp_path, "m", [1, 2])
    manager, _ = _manager(tmp_path)
    assert (await manager.load_model("m")).version == 2
    await manager.unload_model("m")
    await manager.drained()
    assert manager.snapshot.ready_versions("m") == ()
    assert manager.snapshot.model("m").error == "unloaded by UnloadModel"
    assert (await manager.load_model("m")).version == 2
    assert manager.snapshot.model("m").error == ""
    with pytest.raises(ModelNotFound):
        await manager.load_model("missing")
    with pytest.raises(ModelNotFound):
        await manager.unload_model("missing")


@_run
async def test_a_config_change_reloads_all_or_nothing(tmp_path: Path) -> None:
    policy = "version_policy { all {} }\n"
    model_dir = _model(tmp_path, "m", [], config=CONFIG + policy)
    _version(model_dir, 1)
    _version(model_dir, 2, (WIDTH, "8"))
    manager, loader = _manager(tmp_path)
    await manager.load_all()
    old = {v: manager.resolve("m", v) for v in (1, 2)}
    (model_dir / CONFIG_FILE).write_text(CONFIG.replace("8", "4") + policy)
    await _sync(manager)
    error = manager.snapshot.model("m").error
    assert "version 2: load failed: has size 8, config.pbtxt says 4" in error
    assert "still serving the previous config" in error
    assert {v: manager.resolve("m", v) for v in (1, 2)} == old, "nothing switched"
    assert loader.released == [("m", 1)], "the fresh load that worked was dropped"
    built = len(loader.built)
    await _sync(manager)
    assert len(loader.built) == built, "the same failed change is not tried again"
    (model_dir / "2" / WIDTH).write_text("4")
    await _sync(manager)
    assert all(manager.resolve("m", v) is not old[v] for v in (1, 2))
    assert manager.snapshot.model("m").error == ""
    await manager.drained()
    assert [old[v].state for v in (1, 2)] == [State.UNAVAILABLE] * 2


@_run
async def test_a_removed_model_is_retired(tmp_path: Path) -> None:
    model_dir = _model(tmp_path, "m", [1])
    _model(tmp_path, "n", [1])
    manager, loader = _manager(tmp_path)
    await manager.load_all()
    shutil.rmtree(model_dir)
    await _sync(manager)
    with pytest.raises(ModelNotFound):
        manager.resolve("m", 0)
    assert manager.snapshot.removed == ("m",) and [m.name for m in manager.snapshot.models] == ["n"]
    await manager.drained()
    assert loader.released == [("m", 1)]
    _model(tmp_path, "m", [1])
    await _sync(manager)
    assert manager.resolve("m", 0).version == 1 and manager.snapshot.removed == ()


@_run
async def test_model_b_does_not_wait_for_model_a_load(tmp_path: Path) -> None:
    a_dir = _model(tmp_path, "a", [1])
    _model(tmp_path, "b", [1])
    manager, loader = _manager(tmp_path)
    await manager.load_all()
    _version(a_dir, 2)
    loader.build_gates[("a", 2)] = gate = asyncio.Event()
    polling = asyncio.create_task(_sync(manager))  # a full sync: a and b side by side
    await loader.reached("a", 2).wait()
    await manager.unload_model("b")
    assert _rows(manager, "b")[1][0] in (State.UNLOADING, State.UNAVAILABLE)
    assert (await manager.load_model("b")).version == 1
    assert manager.resolve("a", 0).version == 1
    gate.set()
    await polling
    assert manager.resolve("a", 0).version == 2


@_run
async def test_the_snapshot_is_immutable_and_replaced_on_change(tmp_path: Path) -> None:
    model_dir = _model(tmp_path, "m", [1])
    manager, _ = _manager(tmp_path, default_model="m")
    await manager.load_all()
    before = manager.snapshot
    with pytest.raises(AttributeError):
        before.default_model = "x"  # type: ignore[misc]
    _version(model_dir, 2)
    await _sync(manager)
    assert before.ready_versions("m") == (1,) and manager.snapshot.ready_versions("m") == (2,)


def test_one_mapping_from_states_to_both_protos() -> None:
    for state in State:
        value, name = wire_state(state)
        assert pb.VersionState.Name(value) == f"VERSION_STATE_{name}" == \
            f"VERSION_STATE_{state.name}"


@_run
async def test_a_failed_reload_leaves_the_gauges_on_the_serving_version(tmp_path: Path) -> None:
    """The queue gauge of (m, 1) reads the batcher that serves; a reload whose version 1
    loaded but whose version 2 failed must not move it to the dropped session."""
    from bertstream.server.metrics import Metrics

    policy = "version_policy { all {} }\n"
    model_dir = _model(tmp_path, "m", [], config=CONFIG + policy)
    _version(model_dir, 1)
    _version(model_dir, 2, (WIDTH, "8"))
    metrics = Metrics()
    manager, loader = _manager(tmp_path, metrics=metrics)
    await manager.load_all()
    serving = manager.resolve("m", 1).loaded
    serving.batcher.queued = 7  # type: ignore[union-attr]  # an instance attribute
    (model_dir / CONFIG_FILE).write_text(CONFIG.replace("8", "4") + policy)
    await _sync(manager)
    assert loader.released == [("m", 1)], "the reload's version 1 was built, then dropped"
    assert metrics.registry.get_sample_value("bertstream_queue_texts",
                                             {"model": "m", "version": "1"}) == 7


@_run
async def test_a_load_queued_behind_close_loads_nothing(tmp_path: Path) -> None:
    """close() while model m's load is blocked: a LoadModel of m queued behind it must not
    bring a session back once close() has retired m."""
    model_dir = _model(tmp_path, "m", [1])
    manager, loader = _manager(tmp_path)
    loader.build_gates[("m", 1)] = gate = asyncio.Event()
    first = asyncio.create_task(manager.load_all())
    await loader.reached("m", 1).wait()
    closing = asyncio.create_task(manager.close())
    _version(model_dir, 2)
    queued = asyncio.create_task(_sync(manager))  # waits for m's lock, like LoadModel
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(first, closing, queued)
    assert not [mv for mv in manager.models["m"].versions.values()
                if mv.state is State.READY]
    assert ("m", 2) not in loader.built
