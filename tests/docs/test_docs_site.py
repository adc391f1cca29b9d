"""The documentation site builds in strict mode, its generated pages cover the code, and the error tree in
docs/exceptions.md is the one in the code.

The site is built once per run (a few seconds) into a temporary directory with ``mkdocs build --strict``: a
broken link or anchor, a page missing from the nav, or a generator failure fails the build.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXCEPTIONS_MD = ROOT / "docs" / "exceptions.md"


def _load_hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()


def mkdocs_build(config: Path, site_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site_dir)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = mkdocs_build(ROOT / "mkdocs.yml", site_dir)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    return site_dir


def page_text(site: Path, page: str) -> str:
    html = (site / page / "index.html").read_text(encoding="utf-8")
    return re.sub(r"<[^>]+>", " ", html)


def test_the_site_builds_in_strict_mode_with_every_page_of_docs(site: Path) -> None:
    for source in (ROOT / "docs").rglob("*.md"):
        page = source.relative_to(ROOT / "docs").with_suffix("")
        built = site / (page.parent if page.name == "index" else page) / "index.html"
        assert built.is_file(), f"docs/{page}.md was not built"


def test_the_api_reference_lists_every_route_of_the_server(site: Path) -> None:
    text = page_text(site, "reference/api")
    paths = hooks.openapi_schema()["paths"]
    assert len(paths) > 30
    missing = [p for p in paths if re.sub(r"\{(\w+)\}", r"{ \1 }", p).replace(" ", "") not in text.replace(" ", "")]
    assert not missing, f"routes missing from the API reference: {missing}"


@pytest.mark.parametrize(("program", "module"), [(p, m) for p, m, _ in hooks.CLIS])
def test_the_cli_reference_lists_every_command(site: Path, program: str, module: str) -> None:
    text = page_text(site, f"reference/cli/{program}")
    for command in _commands(program, module):
        assert command in text, f"{command!r} is missing from the {program} reference"


def _commands(program: str, module_name: str) -> list[str]:
    """Every command path of a program, read from the program itself (typer app or argparse parser)."""
    import argparse
    import importlib

    module = importlib.import_module(module_name)
    if hasattr(module, "app"):
        import typer

        def walk(command: object, path: list[str]) -> list[str]:
            subs = getattr(command, "commands", {})
            return [" ".join(path), *(c for name, sub in subs.items() for c in walk(sub, [*path, name]))]

        return walk(typer.main.get_command(module.app), [program])
    parser = module._parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [program, *(f"{program} {name}" for action in subparsers for name in action.choices)]


def test_the_error_tree_in_docs_is_generated_from_the_current_classes() -> None:
    docs = EXCEPTIONS_MD.read_text(encoding="utf-8")
    block = docs.split(hooks.TREE_BEGIN)[1].split(hooks.TREE_END)[0]
    assert f"{hooks.TREE_BEGIN}{block}{hooks.TREE_END}" == hooks.error_tree_block(), "run: python scripts/docs_hooks.py"


def test_every_error_of_the_tree_is_described_on_the_page() -> None:
    docs = EXCEPTIONS_MD.read_text(encoding="utf-8")
    prose = re.sub(re.escape(hooks.TREE_BEGIN) + ".*?" + re.escape(hooks.TREE_END), "", docs, flags=re.S)
    names = re.findall(r"(\w+Error)\b", hooks.error_tree())
    assert len(names) > 30
    assert not [n for n in names if f"`{n}`" not in prose], "describe each error in docs/exceptions.md"


def test_the_error_tree_follows_a_new_subclass() -> None:
    """Guard against a tree that cannot change: a new subclass of a family appears under it, with its module."""
    from bundles.errors import InstallError

    class DiskFullError(InstallError):
        """The disk filled up while staging."""

    DiskFullError.__module__ = "device_agent.staging"  # as if defined there
    try:
        tree = hooks.error_tree()
        assert re.search(
            r"├── InstallError .*\n│   ├── SelfTestError .*\n│   └── DiskFullError +-  device_agent\.staging", tree
        )
        assert hooks.error_tree_block() not in EXCEPTIONS_MD.read_text(encoding="utf-8")
    finally:
        DiskFullError.__module__ = __name__  # out of the tree again: not one of our packages


def test_strict_mode_fails_on_a_broken_link(tmp_path: Path) -> None:
    """The project's validation settings turn a broken link and a missing anchor into a failed build."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n[gone](missing.md) and [no anchor](index.md#nowhere)\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: {docs}\nhooks: []\nnav:\n  - index.md\n")
    result = mkdocs_build(config, tmp_path / "site")
    assert result.returncode != 0
    assert "missing.md" in result.stderr and "#nowhere" in result.stderr
