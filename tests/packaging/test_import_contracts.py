"""Every package boundary of DESIGN.md's layout table, checked on the source of every module.

| package | may import (of ours) |
|---|---|
| ``bundles`` | none of the others; third party at module level: numpy, orjson, cryptography, tuf, |
| | securesystemslib, httpx only (runtimes lazily, inside functions) |
| ``device_agent`` | ``bundles`` only |
| ``converter`` | ``bundles`` only |
| ``fleet_server`` | ``bundles`` only |
| ``simulators`` | the public API of the others: no private module or name (``_x``) |

Imports are read with :mod:`ast`, wherever they stand (module level, inside a function, under
``TYPE_CHECKING``): a lazy import is still a dependency. ``tests/packaging/test_device_footprint.py``
checks the device's third-party footprint at run time; this file checks the boundaries between our
own packages, for all five.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("bundles", "converter", "device_agent", "fleet_server", "simulators")
ALLOWED_OURS = {
    "bundles": set(),
    "device_agent": {"bundles"},
    "converter": {"bundles"},
    "fleet_server": {"bundles"},
    "simulators": {"bundles", "converter", "device_agent", "fleet_server"},
}
BUNDLES_MODULE_LEVEL_THIRD_PARTY = {"numpy", "orjson", "cryptography", "tuf", "securesystemslib", "httpx"}


@dataclass(frozen=True)
class Import:
    """One imported name: ``module`` (absolute) and, for ``from m import n``, ``name``."""

    module: str
    name: str | None
    lazy: bool  # inside a function or method body
    where: str  # file:line

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.name}" if self.name else self.module


class _Collector(ast.NodeVisitor):
    def __init__(self, where: str) -> None:
        self.where = where
        self.depth = 0
        self.found: list[Import] = []

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append(Import(alias.name, None, self.depth > 0, f"{self.where}:{node.lineno}"))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module:  # relative: inside the same package
            return
        for alias in node.names:
            self.found.append(Import(node.module, alias.name, self.depth > 0, f"{self.where}:{node.lineno}"))


def imports_of(path: Path, root: Path = ROOT) -> list[Import]:
    collector = _Collector(str(path.relative_to(root)))
    collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return collector.found


def package_imports(package: str, root: Path = ROOT) -> list[Import]:
    return [imp for path in sorted((root / package).rglob("*.py")) for imp in imports_of(path, root)]


def boundary_violations(package: str, root: Path = ROOT) -> list[str]:
    """Each import of ``package`` that crosses a boundary it may not cross, as one readable line."""
    problems = []
    for imp in package_imports(package, root):
        if imp.top in OURS and imp.top != package and imp.top not in ALLOWED_OURS[package]:
            allowed = ", ".join(sorted(ALLOWED_OURS[package])) or "none of the others"
            problems.append(f"{imp.where}: {package} imports {imp.dotted} (of our packages it may import: {allowed})")
        if package == "simulators" and imp.top in OURS and _is_private(imp):
            problems.append(f"{imp.where}: simulators uses a private part of another package: {imp.dotted}")
        if package == "bundles" and not imp.lazy and _third_party(imp.top) and imp.top not in OURS:
            if imp.top not in BUNDLES_MODULE_LEVEL_THIRD_PARTY:
                problems.append(f"{imp.where}: bundles imports {imp.top} at module level (import runtimes lazily)")
    return problems


def _is_private(imp: Import) -> bool:
    parts = imp.dotted.split(".")
    return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts)


def _third_party(top: str) -> bool:
    return top not in sys.stdlib_module_names and top != "__future__"


@pytest.mark.parametrize("package", OURS)
def test_package_crosses_only_the_boundaries_design_md_allows(package: str) -> None:
    assert package_imports(package), f"no imports found in {package}: the scan itself is broken"
    problems = boundary_violations(package)
    assert not problems, "\n".join(problems)


def test_the_checker_catches_each_kind_of_violation(tmp_path: Path) -> None:
    """Guard against a check that cannot fail: one planted violation per rule must be reported."""
    plant = {
        "bundles/leak.py": "import numpy\ndef f():\n    import onnxruntime\nimport torch\nfrom device_agent import x\n",
        "device_agent/leak.py": "def f():\n    from fleet_server.app import create_app\n",
        "converter/leak.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import device_agent.agent\n",
        "fleet_server/leak.py": "from converter import cli\n",
        "simulators/leak.py": "from fleet_server.rollouts.engine import _canary_figures\nimport device_agent._x\n",
    }
    for rel, text in plant.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = {package: boundary_violations(package, tmp_path) for package in OURS}
    assert [p.split(": ", 1)[1] for p in found["bundles"]] == [
        "bundles imports torch at module level (import runtimes lazily)",
        "bundles imports device_agent.x (of our packages it may import: none of the others)",
    ]
    assert "imports fleet_server.app.create_app" in found["device_agent"][0]
    assert "imports device_agent.agent" in found["converter"][0]
    assert "imports converter.cli" in found["fleet_server"][0]
    assert len(found["simulators"]) == 2 and all("private part" in p for p in found["simulators"])
