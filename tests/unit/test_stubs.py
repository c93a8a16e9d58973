"""The committed Python stubs are exactly what the .proto files generate."""

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
PACKAGES = ["bertstream/v1", "bertstream/kserve/v2"]


@pytest.mark.parametrize("package", PACKAGES)
def test_stubs_are_fresh(tmp_path: Path, package: str) -> None:
    generated = sorted((PROTOS / package).glob("*_pb2*.py*"))
    assert generated, f"no generated stubs committed in {package}"
    out = tmp_path / "out"
    (out / package).mkdir(parents=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / package).glob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(PROTOS), f"--python_out={out}",
         f"--pyi_out={out}", f"--grpc_python_out={out}", *protos],
        check=True, cwd=PROTOS,
    )
    fresh = sorted((out / package).glob("*_pb2*.py*"))
    assert [p.name for p in fresh] == [p.name for p in generated]
    stale = [p.name for p in generated
             if not filecmp.cmp(p, out / package / p.name, shallow=False)]
    assert not stale, f"regenerate with `make protos`: {stale} differ from the .proto files"
