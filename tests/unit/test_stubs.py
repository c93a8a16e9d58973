"""The committed Python stubs are exactly what the .proto files generate."""

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
GENERATED = sorted((PROTOS / "bertstream" / "v1").glob("*_pb2*.py*"))


def test_stubs_are_fresh(tmp_path: Path) -> None:
    assert GENERATED, "no generated stubs committed"
    out = tmp_path / "out"
    (out / "bertstream" / "v1").mkdir(parents=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.glob("bertstream/v1/*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(PROTOS), f"--python_out={out}",
         f"--pyi_out={out}", f"--grpc_python_out={out}", *protos],
        check=True, cwd=PROTOS,
    )
    fresh = sorted((out / "bertstream" / "v1").glob("*_pb2*.py*"))
    assert [p.name for p in fresh] == [p.name for p in GENERATED]
    stale = [p.name for p in GENERATED
             if not filecmp.cmp(p, out / "bertstream" / "v1" / p.name, shallow=False)]
    assert not stale, f"regenerate with `make protos`: {stale} differ from the .proto files"
    shutil.rmtree(out)
