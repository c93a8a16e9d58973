"""Session-wide fixtures: a model repository with two tiny random models, exported once.

`tiny-embed` (TASK_EMBED) and `tiny-news` (TASK_CLASSIFY: positive, neutral, negative) are both
2 layers, hidden 64, 4 heads, FFN 128, max_sequence_length 64 (so "too long" tests are cheap),
pooling layers 1 and 2, version 1. Exporting costs a few seconds per model on 2 cores, so it
happens once per session and the folder is shared: tests must treat it as read-only (copy it
with `copy_repository` to change anything).

bertstream.export (and so torch) is imported only when a fixture needs it, so server-only
installs can still run the tests that do not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from bertstream.export import ExportOptions

TINY_EMBED = "tiny-embed"
TINY_NEWS = "tiny-news"
TINY_NEWS_LABELS = ("positive", "neutral", "negative")
TINY_SHAPE = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128}
TINY_MAX_SEQUENCE_LENGTH = 64
TINY_POOLING_LAYERS = (-1, -2)


def tiny_options(model: str, repository: Path, **overrides: Any) -> ExportOptions:
    """ExportOptions for a tiny random model; `overrides` replace any field (`seed` and the
    TINY_SHAPE keys go to the random shape)."""
    from bertstream.export import ExportOptions, RandomShape

    shape_keys = {*TINY_SHAPE, "seed", "max_position_embeddings"}
    shape = {**TINY_SHAPE, **{k: overrides.pop(k) for k in list(overrides) if k in shape_keys}}
    fields: dict[str, Any] = {
        "model": model,
        "model_repository": repository,
        "random_shape": RandomShape(**shape),
        "max_sequence_length": TINY_MAX_SEQUENCE_LENGTH,
        "pooling_layers": TINY_POOLING_LAYERS,
        **overrides,
    }
    return ExportOptions(**fields)


def version_dir(repository: Path, model: str, version: int | None = None) -> Path:
    """A model's version folder; the highest published one when `version` is None."""
    if version is None:
        versions = [int(p.name) for p in (repository / model).iterdir() if p.name.isdigit()]
        version = max(versions)
    return repository / model / str(version)


def openvino_repository(model_repository: Path, destination: Path) -> Path:
    """The session's models with `backend: "openvino"` at f32 (the tests compare vectors
    with onnxruntime's at 1e-4; bf16 is checked at cosine level in test_openvino.py)."""
    for model in ("tiny-embed", "tiny-news"):
        shutil.copytree(model_repository / model, destination / model)
        config = destination / model / "config.pbtxt"
        config.write_text(config.read_text("utf-8") + 'backend: "openvino"\nparameters { key: '
                          '"INFERENCE_PRECISION_HINT" value { string_value: "f32" } }\n',
                          "utf-8")
    return destination


TINY_PAIR = "tiny-pair"


def pair_repository(model_repository: Path, destination: Path) -> Path:
    """The shared tiny models plus `tiny-pair`: tiny-news's graph served as a pair model (its
    config says text_pairs: true; the graph takes token_type_ids like every BERT graph)."""
    for model in (TINY_EMBED, TINY_NEWS):
        shutil.copytree(model_repository / model, destination / model)
    shutil.copytree(model_repository / TINY_NEWS, destination / TINY_PAIR)
    config = destination / TINY_PAIR / "config.pbtxt"
    text = config.read_text("utf-8").replace(f'name: "{TINY_NEWS}"', f'name: "{TINY_PAIR}"')
    config.write_text(text + "text_pairs: true\n", "utf-8")
    return destination


def copy_repository(repository: Path, destination: Path) -> Path:
    """A private, writable copy of the shared repository."""
    return Path(shutil.copytree(repository, destination))


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared repository: tiny-embed/1 and tiny-news/1, plus their config.pbtxt."""
    from bertstream.export import export_model

    repository = tmp_path_factory.mktemp("model_repository")
    export_model(tiny_options(TINY_EMBED, repository))
    export_model(tiny_options(TINY_NEWS, repository, labels=TINY_NEWS_LABELS))
    return repository


@pytest.fixture(scope="session")
def openvino_model_repository(model_repository: Path,
                              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared repository's models on OpenVINO at f32 (see `openvino_repository`)."""
    pytest.importorskip("openvino")
    return openvino_repository(model_repository, tmp_path_factory.mktemp("openvino"))


@pytest.fixture(scope="session")
def pair_model_repository(model_repository: Path,
                          tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-embed, tiny-news and tiny-pair (see `pair_repository`)."""
    return pair_repository(model_repository, tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="session")
def make_tiny_options() -> Callable[..., ExportOptions]:
    """`make_tiny_options(model, repository, **overrides)`: see `tiny_options`."""
    return tiny_options


@pytest.fixture(scope="session")
def model_dir(model_repository: Path) -> Callable[..., Path]:
    """`model_dir("tiny-news")` -> the model's latest version folder in the shared repository
    (`model_dir("tiny-news", 1)` for a given version)."""

    def find(model: str, version: int | None = None) -> Path:
        return version_dir(model_repository, model, version)

    return find


READY_LINE = "bertstream serving on "


class ServerProcess:
    """A real `python -m bertstream.server` on a free loopback port; `address` once ready."""

    def __init__(self, repository: Path, *extra: str, default_model: str = "tiny-embed") -> None:
        # onnxruntime unless a test asks for another engine (a later --cpu-engine wins): the
        # tests compare vectors with onnxruntime's at tight tolerances, and OpenVINO's own
        # are tests/integration/test_openvino.py and the `server` fixture's second engine.
        cmd = [sys.executable, "-m", "bertstream.server", "--model-repository", str(repository),
               "--host", "127.0.0.1", "--port", "0", "--default-model", default_model,
               "--http-port", "0", "--cpu-engine", "onnxruntime", *extra]
        self.engine = "onnxruntime"  # what its models run on, when a fixture chose another
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.lines: list[str] = []
        self.address = self._wait_ready(timeout=180)
        # Keep draining the log so the server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self, timeout: float) -> str:
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith(READY_LINE):
                    return line[len(READY_LINE):].strip()
        finally:
            timer.cancel()
        raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)


@pytest.fixture(scope="session")
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """`start_server(repository, *flags, default_model=...)`: a server process, stopped at the
    end of the session if the test did not stop it."""
    started: list[ServerProcess] = []

    def start(repository: Path, *extra: str, default_model: str = "tiny-embed") -> ServerProcess:
        proc = ServerProcess(repository, *extra, default_model=default_model)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.stop()


# `make test-fast` (`pytest -m fast`): the edit loop's tier, under a minute on 2 cores. It holds
# every test under tests/unit/ (a new file there is picked up by its folder) and the in-process
# modules listed here: none starts a server process or exports a model beyond the session
# fixture above. A module elsewhere may also opt in with `pytestmark = pytest.mark.fast`.
# `make test` still runs everything.
TESTS = Path(__file__).parent
FAST_FOLDERS = ("unit",)
FAST_MODULES = (
    "export/test_export_publish.py",
    "export/test_export_repository.py",
    "export/test_export_tokenizer.py",
    "export/test_training_data.py",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fast: in-process, no server process, no export of its own (make test-fast)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            relative = item.path.relative_to(TESTS)
        except ValueError:
            continue
        if relative.parts[0] in FAST_FOLDERS or relative.as_posix() in FAST_MODULES:
            item.add_marker(pytest.mark.fast)
