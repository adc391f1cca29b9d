"""bundles.tuf stays importable on a device: only the agent extra (httpx, tuf, securesystemslib, cryptography)."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ["fastapi", "sqlalchemy", "torch", "tensorflow", "typer", "rich", "onnx", "uvicorn", "pydantic", "click"]
MODULES = ["keys", "root", "publication", "repository", "client", "common", "cli", "testing"]

# Runs in a fresh interpreter where the forbidden packages behave as if not installed.
PROGRAM = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {FORBIDDEN!r}:
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
{"".join(f"import bundles.tuf.{m}" + chr(10) for m in MODULES)}
print("ok")
"""


def test_every_tuf_module_imports_with_server_and_converter_packages_absent() -> None:
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
