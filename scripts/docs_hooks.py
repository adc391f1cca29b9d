"""Reference pages generated from the code, for the documentation site (``mkdocs.yml`` loads this as a hook).

At build time (``on_files``) the site gains pages that are never written by hand, so they cannot drift:

- ``reference/api.md``: the fleet server's HTTP API, rendered from the OpenAPI schema of the app that
  ``fleet_server.app.create_app`` builds (``essentials-openapi`` turns the schema into Markdown);
- ``reference/cli/<program>.md``: every command, argument and option of ``edgefleet-convert``,
  ``edgefleet-server`` (typer, read through click) and ``edgefleet-agent`` (argparse).

``docs/exceptions.md`` is hand-written except for its error tree, which :func:`error_tree` renders from the
classes themselves; ``tests/docs/test_docs_site.py`` keeps the two equal. After changing the error tree run
``python scripts/docs_hooks.py`` to rewrite that block.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bundles", "device_agent", "converter", "fleet_server")
TREE_BEGIN, TREE_END = "<!-- BEGIN error-tree -->", "<!-- END error-tree -->"
CLIS = (
    ("edgefleet-convert", "converter.cli", "typer"),
    ("edgefleet-server", "fleet_server.cli", "typer"),
    ("edgefleet-agent", "device_agent.cli", "argparse"),
    ("edgefleet-sim", "simulators.fleet.cli", "typer"),
)


# --- the error tree ---------------------------------------------------------------------------------------------------
def _import_all(packages: tuple[str, ...] = PACKAGES) -> None:
    """Import every module of ``packages`` so that every ``EdgeFleetError`` subclass exists."""
    for name in packages:
        package = importlib.import_module(name)
        for module in pkgutil.walk_packages(package.__path__, name + "."):
            if ".migrations." not in module.name and not module.name.endswith("__main__"):
                importlib.import_module(module.name)


def _children(cls: type) -> list[type]:
    """Subclasses defined in our packages: ``bundles.errors`` first, then by module; in a module, in source order
    (``__subclasses__`` keeps definition order, and the sort is stable)."""
    ours = [c for c in cls.__subclasses__() if c.__module__.split(".")[0] in PACKAGES]
    return sorted(ours, key=lambda c: (c.__module__ != "bundles.errors", c.__module__))


def _http_status(cls: type) -> str:
    """The status the fleet server answers when it raises ``cls`` (``-``: never raised by the server)."""
    from fleet_server.errors import STATUS_BY_ERROR

    return next((str(status) for family, status in STATUS_BY_ERROR if issubclass(cls, family)), "-")


def _tree_lines(cls: type, prefix: str, last: bool, top: bool) -> Iterator[str]:
    branch = "" if top else ("└── " if last else "├── ")
    label = f"{prefix}{branch}{cls.__name__}"
    yield f"{label:<40} {_http_status(cls):>4}  {cls.__module__}"
    children = _children(cls)
    inner = prefix if top else prefix + ("    " if last else "│   ")
    for i, child in enumerate(children):
        yield from _tree_lines(child, inner, i == len(children) - 1, False)


def error_tree() -> str:
    """The ``EdgeFleetError`` hierarchy as a text tree: class, HTTP status on the server, defining module."""
    _import_all()
    from bundles.errors import EdgeFleetError

    header = f"{'error':<40} {'HTTP':>4}  defined in"
    return "\n".join([header, *_tree_lines(EdgeFleetError, "", True, True)])


def error_tree_block() -> str:
    return f"{TREE_BEGIN}\n```text\n{error_tree()}\n```\n{TREE_END}"


def write_error_tree(path: Path = ROOT / "docs" / "exceptions.md") -> bool:
    """Rewrite the generated block of ``docs/exceptions.md``; True if it changed."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(TREE_BEGIN) + ".*?" + re.escape(TREE_END), re.S)
    new = pattern.sub(lambda _: error_tree_block(), text)
    path.write_text(new, encoding="utf-8")
    return new != text


# --- the HTTP API from OpenAPI ----------------------------------------------------------------------------------------
def openapi_schema() -> dict[str, Any]:
    """The OpenAPI schema of a real app (dev settings in a throwaway data directory; nothing is served)."""
    import logging

    from fleet_server.app import create_app
    from fleet_server.settings import Settings

    settings_log = logging.getLogger("fleet_server.settings")
    level = settings_log.level
    settings_log.setLevel(logging.ERROR)  # the dev-mode warnings are expected here
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            app = create_app(Settings(mode="dev", data_dir=Path(data_dir), background_tasks=False))
            schema: dict[str, Any] = app.openapi()
            app.state.engine.dispose()
    finally:
        settings_log.setLevel(level)
    return schema


def api_reference() -> str:
    from openapidocs.mk.v3 import OpenAPIV3DocumentationHandler

    body = OpenAPIV3DocumentationHandler(openapi_schema()).write()
    body = re.sub(r"^<!--.*?-->\s*", "", body, flags=re.S)  # the generator's banner
    intro = (
        "Generated at build time from the OpenAPI schema of `fleet_server.app.create_app` "
        "(the running server also serves it at `/openapi.json` and `/docs`). "
        "The hand-written overview, with the authentication and error conventions, is [HTTP API](../api.md).\n\n"
    )
    return re.sub(r"^(# .*\n)", lambda m: m.group(1) + "\n" + intro, body, count=1, flags=re.M)


# --- the command-line programs ----------------------------------------------------------------------------------------
def _typer_reference(program: str, module: Any) -> str:
    """typer's own Markdown generator (the code behind ``typer MODULE utils docs``), help text kept plain."""
    import typer
    from typer.cli import get_docs_for_click

    command = typer.main.get_command(module.app)
    return get_docs_for_click(obj=command, ctx=typer.Context(command, info_name=program), name=program)


def _argparse_invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar if isinstance(action.metavar, str) else action.dest
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return ", ".join(f"{name} {metavar}" for name in action.option_strings)


def _argparse_sections(parser: argparse.ArgumentParser, path: list[str], depth: int) -> Iterator[str]:
    """The same layout as typer's generator: title, description, usage, arguments, options, sub-commands."""
    yield f"{'#' * min(depth, 6)} `{' '.join(path)}`\n"
    if parser.description:
        yield parser.description + "\n"
    usage = parser.format_usage().removeprefix("usage: ").strip()
    yield f"**Usage**:\n\n```console\n$ {' '.join(usage.split())}\n```\n"
    actions = [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]
    for title, wanted in (("Arguments", False), ("Options", True)):
        items = [f"* `{_argparse_invocation(a)}`: {a.help or ''}" for a in actions if bool(a.option_strings) == wanted]
        if items:
            yield f"**{title}**:\n\n" + "\n".join(items) + "\n"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            yield "**Commands**:\n\n" + "\n".join(f"* `{n}`: {helps.get(n) or ''}" for n in action.choices) + "\n"
            for name, sub in action.choices.items():
                sub.description = sub.description or helps.get(name)
                yield from _argparse_sections(sub, [*path, name], depth + 1)


def cli_reference(program: str) -> str:
    module_name, kind = next((m, k) for p, m, k in CLIS if p == program)
    module = importlib.import_module(module_name)
    intro = (
        f"Generated at build time from `{module_name}` ({kind}): every command, argument and option of "
        f"`{program}`, with its help text. `{program} COMMAND --help` prints the same on the command line.\n"
    )
    if kind == "typer":
        body = _typer_reference(program, module)
    else:
        body = "\n".join(_argparse_sections(module._parser(), [program], 1))
    title, _, rest = body.partition("\n")
    return f"{title}\n\n{intro}{rest.rstrip()}\n"


# --- the mkdocs hook --------------------------------------------------------------------------------------------------
def generated_pages() -> dict[str, str]:
    """Site path -> Markdown of every generated page."""
    pages = {"reference/api.md": api_reference()}
    pages.update({f"reference/cli/{program}.md": cli_reference(program) for program, _, _ in CLIS})
    return pages


def on_files(files: Any, config: Any) -> Any:
    """mkdocs hook: add the generated reference pages to the site."""
    from mkdocs.structure.files import File

    sys.path.insert(0, str(ROOT))
    for src_uri, content in generated_pages().items():
        files.append(File.generated(config, src_uri, content=content))
    return files


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    changed = write_error_tree()
    print("docs/exceptions.md: error tree " + ("rewritten" if changed else "already up to date"))  # noqa: T201
