"""The documentation site builds in strict mode, its generated pages cover the code, and the error tree in
docs/exceptions.md is the one in the code.

The site is built once per run (a few seconds) into a temporary directory with ``mkdocs build --strict``: a
broken link or anchor, a page missing from the nav, or a generator failure fails the build.
"""

from __future__ import annotations

import html
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


# The pages a reader of the site is promised, each with the sections it must have (heading text, as built).
PROMISED = {
    "quickstart": ["Quickstart"],
    "architecture": ["Architecture", "Packages and what each may import"],
    "bundle-format": ["The edgefleet bundle format", "2. Manifest fields", "3. Archives",
                      "4. Distribution through TUF"],
    "security": ["Security model", "What a compromised fleet server can and cannot do", "Threats, by attacker",
                 "Key rotation"],
    "operations": ["PostgreSQL", "TLS termination", "Backups and restore", "Scaling", "Key rotation drills"],
    "install-device": ["Raspberry Pi OS", "NVIDIA Jetson (JetPack 6", "Run it under systemd",
                       "Update the agent itself"],
    "reference/api": ["edgefleet fleet server", "device", "admin", "rollouts", "Schemas"],
    **{f"reference/cli/{program}": [program] for program, _, _ in hooks.CLIS},
    "exceptions": ["Errors"],
    "benchmarks": ["Benchmarks"],
}  # fmt: skip


def headings(site: Path, page: str) -> list[str]:
    text = (site / page / "index.html").read_text(encoding="utf-8")
    found = re.findall(r"<h[1-3][^>]*>(.*?)</h[1-3]>", text, flags=re.S)
    return [html.unescape(re.sub(r"<[^>]+>", "", h)).replace("¶", "").strip() for h in found]


@pytest.mark.parametrize("page", sorted(PROMISED))
def test_each_promised_page_is_built_with_its_sections(site: Path, page: str) -> None:
    assert (site / page / "index.html").is_file(), f"the site has no {page} page"
    built = headings(site, page)
    missing = [want for want in PROMISED[page] if not any(h.startswith(want) for h in built)]
    assert not missing, f"{page}: no section starting {missing} among {built}"


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
