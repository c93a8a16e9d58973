"""The Node.js example client for tests: find node and npm, make sure the pinned modules are
installed, run cli.js. Shared by tests/clients and tests/security (tests/ is on sys.path)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

NODE_DIR = Path(__file__).resolve().parents[1] / "client" / "examples" / "node"
PINNED = ("@grpc/grpc-js", "@grpc/proto-loader")
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT",
                  "ENETUNREACH", "EHOSTUNREACH", "network")


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def error_code(self) -> str:
        assert self.returncode != 0 and self.stdout == "", self.stdout
        return str(json.loads(self.stderr)["error"]["code"])


def _missing_modules() -> list[str]:
    wanted = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    missing = []
    for package in PINNED:
        manifest = NODE_DIR / "node_modules" / package / "package.json"
        if not manifest.is_file() or json.loads(manifest.read_text())["version"] != wanted[package]:
            missing.append(f"{package}@{wanted[package]}")
    return missing


def node_with_modules(what: str) -> str:
    """The `node` executable, after `npm ci` if node_modules lacks the pinned modules.
    Skips `what` with the reason where node or npm is missing or the registry is unreachable;
    any other npm failure fails the test."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(f"`{n}`" for n, p in (("node", node), ("npm", npm)) if p is None)
        pytest.skip(f"{what} skipped: {missing} not on PATH "
                    "(install Node.js >= 18 with npm to run it)")
    if _missing_modules():
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            log = proc.stdout + proc.stderr
            if any(marker in log for marker in NETWORK_ERRORS):
                pytest.skip(f"{what} skipped: `npm ci` in client/examples/node could not reach "
                            f"the npm registry:\n{log[-2000:]}")
            pytest.fail(f"`npm ci` in client/examples/node failed:\n{log[-4000:]}")
    return node


def run_cli(node: str, *args: str, env: dict[str, str] | None = None) -> Result:
    proc = subprocess.run([node, str(NODE_DIR / "cli.js"), *args], capture_output=True,
                          text=True, timeout=120, check=False, env=env)
    return Result(proc.returncode, proc.stdout, proc.stderr)
