"""The agent on linux/aarch64, the fast part: its dependencies have wheels there, and the ARM check runs every
device test module.

``make check-arm64`` (``scripts/check_arm64.sh``) runs the agent's tests in an emulated Debian arm64 root; it
takes many minutes, so it is not part of ``make test``. What is checked here, in seconds:

- the dependency closure of ``edgefleet[agent,onnx,tflite]`` resolves to wheels (nothing to compile) for
  Python 3.10 (JetPack 6) and 3.11 (Raspberry Pi OS Bookworm) on ``manylinux_2_35_aarch64`` (glibc 2.35, the
  older of the two). uv resolves for the target's interpreter and platform, markers included (pip evaluates
  ``python_version`` and ``platform_machine`` markers against the host, so it would miss ``tomli`` and
  ``exceptiongroup`` on 3.10). This asks the package index, like the device would.
- ``scripts/arm64-tests.txt``, the selection the ARM check runs, names only tests that exist and leaves out no
  test module of ``tests/bundles`` or ``tests/device_agent``, nor an agent end-to-end test
  (``tests/e2e/test_agent_*.py``), without saying why;
- the selection collects in an interpreter where the server's and the workstation's packages cannot be
  imported, as in the device root (a conftest importing typer or torch at module level stops the whole ARM run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
SELECTION = ROOT / "scripts" / "arm64-tests.txt"
DEVICE_EXTRAS = ("agent", "onnx", "tflite")
PLATFORM = "aarch64-manylinux_2_35"


def device_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    return [*project["dependencies"], *(req for extra in DEVICE_EXTRAS for req in extras[extra])]


def resolve_for(python_version: str, requirements: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv is missing: it comes with the dev extra (pip install -e '.[dev]')"
    spec = tmp_path / "device.in"
    spec.write_text("\n".join(requirements) + "\n", encoding="utf-8")
    command = [uv, "pip", "compile", str(spec), "--python-version", python_version, "--python-platform", PLATFORM,
               "--only-binary", ":all:", "--no-header", "--no-annotate", "--quiet"]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def pinned_names(lock: str) -> set[str]:
    return {line.split("==")[0].lower() for line in lock.splitlines() if "==" in line}


@pytest.mark.parametrize("python_version", ["3.10", "3.11"])
def test_agent_dependencies_resolve_to_aarch64_wheels(python_version: str, tmp_path: Path) -> None:
    result = resolve_for(python_version, device_requirements(), tmp_path)
    assert result.returncode == 0, f"no aarch64 wheels for Python {python_version}:\n{result.stderr}"
    names = pinned_names(result.stdout)
    assert {"numpy", "onnxruntime", "ai-edge-litert", "cryptography", "tuf", "httpx"} <= names
    assert ("tomli" in names) == (python_version == "3.10"), "the tomli marker was not evaluated for the target"
    assert not names & {"fastapi", "sqlalchemy", "torch", "tensorflow", "typer", "rich"}


def test_the_check_fails_for_a_package_without_aarch64_wheels(tmp_path: Path) -> None:
    """Guard against a check that cannot fail: mkl publishes x86_64 and Windows wheels only."""
    result = resolve_for("3.11", ["mkl"], tmp_path)
    assert result.returncode != 0
    assert "aarch64" in result.stderr


def selection_lines() -> list[str]:
    lines = SELECTION.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_the_arm64_selection_names_only_tests_that_exist() -> None:
    for line in selection_lines():
        path, _, node = line.removeprefix("--ignore=").removeprefix("--deselect=").partition("::")
        assert (ROOT / path).exists(), f"{SELECTION.name}: {path} does not exist"
        if node:
            assert re.search(rf"^def {re.escape(node)}\(", (ROOT / path).read_text(), re.M), f"no test {line}"


def test_the_arm64_selection_covers_every_device_test_module() -> None:
    listed = [line.removeprefix("--ignore=").split("::")[0] for line in selection_lines()]
    modules = [
        *sorted((ROOT / "tests" / "bundles").rglob("test_*.py")),
        *sorted((ROOT / "tests" / "device_agent").rglob("test_*.py")),
        *sorted((ROOT / "tests" / "e2e").glob("test_agent_*.py")),
    ]
    missing = [
        str(m.relative_to(ROOT))
        for m in modules
        if not any(m == ROOT / p or (ROOT / p).is_dir() and (ROOT / p) in m.parents for p in listed)
    ]
    assert not missing, f"add to {SELECTION.relative_to(ROOT)} (or --ignore with a reason): {missing}"


# What the device root does not have: the server's, the workstation's and the developer's packages (the root has
# the agent,onnx,tflite extras and the test tools pytest, pytest-timeout, hypothesis and onnx).
NOT_IN_THE_DEVICE_ROOT = (
    "fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "pydantic", "pydantic_settings", "psycopg",
    "prometheus_client", "typer", "rich", "zstandard", "pyarrow", "jinja2", "itsdangerous", "torch", "onnxscript",
    "skl2onnx", "sklearn", "matplotlib", "litert_torch", "ai_edge_quantizer", "coremltools", "llama_cpp", "gguf",
    "transformers", "sentencepiece", "safetensors", "schemathesis", "tritonclient", "playwright", "openai", "mkdocs",
)  # fmt: skip
_COLLECT = """
import sys
import pytest
BLOCKED = set({blocked!r})

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"not in the device root: {{name}}")
        return None

sys.meta_path.insert(0, Block())
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "pytest_timeout", *sys.argv[1:]]))
"""


def collect_without_server_packages(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # plugins of the host's venv (schemathesis, ...)
    probe = _COLLECT.format(blocked=NOT_IN_THE_DEVICE_ROOT)
    return subprocess.run([sys.executable, "-c", probe, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_the_arm64_selection_collects_without_the_server_and_workstation_packages() -> None:
    result = collect_without_server_packages(selection_lines(), ROOT)
    assert result.returncode == 0, f"the ARM run could not collect its tests:\n{result.stdout[-4000:]}{result.stderr}"
    assert re.search(r"^(\d+/)?\d{3,} tests collected", result.stdout, re.M), result.stdout[-2000:]


def test_the_collection_probe_catches_a_module_level_import_of_a_server_package(tmp_path: Path) -> None:
    """Guard against a probe that cannot fail: a conftest importing typer at module level stops collection."""
    (tmp_path / "conftest.py").write_text("import typer\n")
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    result = collect_without_server_packages([str(tmp_path)], tmp_path)
    assert result.returncode != 0
    assert "not in the device root: typer" in result.stdout + result.stderr


def test_the_arm64_check_script_parses() -> None:
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "check_arm64.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
