"""The device installs only ``edgefleet[agent,onnx]``: prove nothing heavier leaks into its import graph.

Each check runs in a fresh interpreter with an import hook that makes the server- and
workstation-side packages unimportable, then imports every module of ``bundles`` and
``device_agent``. A module that pulls in fastapi, sqlalchemy, torch, tensorflow, typer or rich
(directly or through another module) fails here with the chain that led to it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("fastapi", "starlette", "sqlalchemy", "alembic", "torch", "tensorflow", "typer", "rich", "pydantic")
DEVICE_PACKAGES = ("bundles", "device_agent")

_PROBE = """
import importlib, pkgutil, sys
FORBIDDEN = set({forbidden!r})

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"forbidden on the device: {{name}}")
        return None

sys.meta_path.insert(0, Block())
failures = []
for pkg_name in {packages!r}:
    pkg = importlib.import_module(pkg_name)
    for mod in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
        if mod.name.endswith((".testing", ".__main__")):
            continue
        try:
            importlib.import_module(mod.name)
        except ImportError as e:
            failures.append(f"{{mod.name}}: {{e}}")
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def _device_modules() -> list[Path]:
    return [p for pkg in DEVICE_PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_device_packages_import_without_server_or_workstation_dependencies() -> None:
    probe = _PROBE.format(forbidden=FORBIDDEN, packages=DEVICE_PACKAGES)
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"device modules import forbidden packages:\n{result.stdout}{result.stderr}"


def test_the_probe_itself_catches_a_forbidden_import(tmp_path: Path) -> None:
    """Guard against a probe that cannot fail: a module importing fastapi must be reported."""
    pkg = tmp_path / "leaky"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "server_bits.py").write_text("import fastapi\n")
    probe = _PROBE.format(forbidden=FORBIDDEN, packages=("leaky",))
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "leaky.server_bits" in result.stdout


@pytest.mark.parametrize("path", _device_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_device_code_parses_as_python_3_10(path: Path) -> None:
    ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 10))
