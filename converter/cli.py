"""``edgefleet-convert``: the workstation CLI (typer + rich).

Every command turns an edgefleet error into one line on stderr (``error: model digits@2, variant
onnx-int8-static: ...``) and a non-zero exit: 2 for bad input or options, 3 when a gate refused
the conversion, 1 for any other failure. Set ``EDGEFLEET_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import functools
import json
import os
import webbrowser
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bundles.errors import ConfigError, EdgeFleetError, GateFailedError
from converter.context import about
from converter.home import Home
from converter.readout import Request
from converter.registry import ModelVersion, Registry
from converter.spec import Budgets, ModelSpec, format_tensor_spec, parse_drop, parse_input_spec

app = typer.Typer(help="Register, convert, validate and publish models for edgefleet devices.", no_args_is_help=True)
keys_app = typer.Typer(help="Release keys (TUF root and targets roles), kept offline on this workstation.")
app.add_typer(keys_app, name="keys")
console = Console(width=None if Console().is_terminal else 200)
err_console = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 400)
F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(command: F) -> F:
    """Print edgefleet errors as one line and exit non-zero; unexpected errors too, unless EDGEFLEET_DEBUG."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except EdgeFleetError as e:
            err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2 if isinstance(e, ConfigError) else 3 if isinstance(e, GateFailedError) else 1) from e
        except Exception as e:
            if os.environ.get("EDGEFLEET_DEBUG"):
                raise
            err_console.print(
                f"error: unexpected {type(e).__name__}: {e}", markup=False, highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from e

    return wrapper  # type: ignore[return-value]


def _split_ref(ref: str) -> tuple[str, int | None]:
    """``digits`` -> (digits, None), ``digits@3`` -> (digits, 3)."""
    name, sep, version = ref.partition("@")
    if not sep:
        return name, None
    if not version.isdigit():
        raise ConfigError(f"'{ref}' is not NAME or NAME@VERSION")
    return name, int(version)


def _registry() -> Registry:
    return Registry(Home.from_env())


def _json_list(path: Path | None, what: str) -> tuple[dict[str, Any], ...]:
    if path is None:
        return ()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} {path} is not a readable JSON file ({e})") from e
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ConfigError(f"{what} {path} must hold a JSON list of objects")
    return tuple(data)


def _labels(path: Path | None) -> tuple[str, ...]:
    if path is None:
        return ()
    try:
        return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    except OSError as e:
        raise ConfigError(f"labels file {path} is not readable ({e})") from e


@keys_app.command("init")
@one_line_errors
def keys_init(
    force: bool = typer.Option(False, "--force", help="Replace existing keys (needs a root rotation)."),
) -> None:
    """Generate the release keys (TUF root and targets) in $EDGEFLEET_HOME/keys, mode 0600."""
    from converter.publish import init_keys

    home = Home.from_env()
    for role, keyid in init_keys(home, overwrite=force).items():
        console.print(f"{role} key {keyid[:16]}... written to {home.keys_dir / (role + '.key')}")


@app.command()
@one_line_errors
def register(
    name: str = typer.Argument(..., help="Model name (lowercase)."),
    source: str = typer.Option(
        ..., help="torch:file.py:factory | torch:model.pt2 | onnx:model.onnx | sklearn:model.pkl"
    ),
    input_spec: str = typer.Option(..., "--input", help="e.g. 'x: float32[-1,1,8,8]' (-1 = 1..32, or 1..64)."),
    task: str = typer.Option(..., help="classification | regression | embedding (see docs/converter.md)"),
    eval_path: Path = typer.Option(..., "--eval", help=".npz or .parquet with inputs and labels."),
    metric: str | None = typer.Option(
        None,
        help="accuracy | top3 | top5 | f1 | label_accuracy | mae | rmse | mse | r2 | cosine | nn_agreement "
        "(default: the task's first)",
    ),
    output: str | None = typer.Option(
        None,
        help="NAME[:FORM]: the output the metric reads, and how (logits, probabilities, binary-logit, "
        "binary-probability, multilabel-logits, multilabel-probabilities, values, embedding); inferred if omitted.",
    ),
    threshold: float | None = typer.Option(None, help="Decision threshold (a probability) for binary/multi-label."),
    weights: Path | None = typer.Option(None, help="State dict for a torch factory."),
    random_init: bool = typer.Option(False, "--random-init", help="Register a torch factory without --weights."),
    calibration: Path | None = typer.Option(None, help="Calibration inputs for static int8."),
    labels: Path | None = typer.Option(None, help="Class names, one per line, in output order."),
    max_drop: str | None = typer.Option(
        None, help="Largest allowed metric loss: absolute (0.01) or relative to the source (2%); default per metric."
    ),
    max_latency_ms: float | None = typer.Option(None, help="p95 latency budget at batch 1, ms."),
    max_size_bytes: int | None = typer.Option(None, help="Largest variant size in bytes."),
    max_memory_mb: float | None = typer.Option(None, help="Largest peak-RSS growth while loading and running, MB."),
    max_latency_ratio: float = typer.Option(
        1.1, help="Quantised vs fp32 latency allowed, at batch 1 and at the typical batch."
    ),
    latency_batch: int = typer.Option(32, help="The model's typical batch size (throughput latency)."),
    prefer: str = typer.Option("speed", help="speed: refuse a variant slower than fp32; size: keep it, saying why."),
    min_top1_agreement: float | None = typer.Option(None, help="Least top-1 agreement with the source."),
    min_cosine: float | None = typer.Option(None, help="Least mean cosine similarity with the source outputs."),
    calibration_method: str = typer.Option("minmax", help="minmax | entropy | percentile"),
    features: Path | None = typer.Option(None, help="JSON list of feature specs."),
    preprocess: Path | None = typer.Option(None, help="JSON list of pre-processing steps."),
    postprocess: Path | None = typer.Option(None, help="JSON list of post-processing steps."),
    label_key: str = typer.Option("y", help="Name of the labels array/column in the data files."),
    deadline_ms: float | None = typer.Option(None, help="Serving: answer through the fallback chain past this, ms."),
    confidence_threshold: float | None = typer.Option(None, help="Serving: fall back below this top-1 confidence."),
    static_answer: str | None = typer.Option(
        None, help='Serving: the fallback chain\'s last answer, a JSON object or a .json file ({"label": ["unknown"]}).'
    ),
) -> None:
    """Register a new immutable version of a model with its data, metric, budgets and serving policy."""
    from converter.register import register as do_register
    from converter.spec import ServingPolicy

    with about(f"{name} (new version)", "source"):
        budgets = _budgets(
            max_drop=max_drop, max_latency_ms=max_latency_ms, max_size_bytes=max_size_bytes,
            max_memory_mb=max_memory_mb, max_latency_ratio=max_latency_ratio, latency_batch=latency_batch,
            prefer=prefer, min_top1_agreement=min_top1_agreement, min_cosine=min_cosine,
        )  # fmt: skip
        policy = ServingPolicy(deadline_ms, confidence_threshold, _json_object_option(static_answer, "--static-answer"))
        spec = ModelSpec(
            task=task, inputs=parse_input_spec(input_spec), metric=metric, budgets=budgets, labels=_labels(labels),
            features=_json_list(features, "features file"), preprocess=_json_list(preprocess, "preprocess file"),
            postprocess=_json_list(postprocess, "postprocess file"), calibration_method=calibration_method,
            label_key=label_key, request=Request.parse(output, threshold), random_init=random_init, serving=policy,
        )  # fmt: skip
    model = do_register(_registry(), name, source, weights, spec, eval_path, calibration)
    console.print(f"registered {model.ref} (source sha256 {model.source_sha256[:16]}...)")
    readout = model.spec.readout
    if readout is not None:
        console.print(f"metric {model.spec.metric} reads {readout.describe()}", markup=False, highlight=False)


def _budgets(max_drop: str | None, **others: Any) -> Budgets:
    """Budgets from the register options; ``--max-drop`` is parsed as absolute or relative (``2%``)."""
    drop, relative = parse_drop(max_drop) if max_drop is not None else (None, False)
    return Budgets(max_drop=drop, max_drop_relative=relative, **others)


def _json_object_option(value: str | None, option: str) -> dict[str, Any] | None:
    """An option given as inline JSON or as the path of a JSON file."""
    if value is None:
        return None
    try:
        text = value if value.lstrip().startswith("{") else Path(value).read_text(encoding="utf-8")
        parsed = json.loads(text)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{option}: not a JSON object or a readable JSON file ({e})") from e
    if not isinstance(parsed, dict):
        raise ConfigError(f"{option}: expected a JSON object")
    return parsed


@app.command("list")
@one_line_errors
def list_models() -> None:
    """List registered models (latest version of each)."""
    registry = _registry()
    latest: dict[str, ModelVersion] = {}
    for model in registry.versions():
        latest[model.name] = model
    if not latest:
        console.print("no model registered yet (see 'edgefleet-convert register --help')")
        return
    table = Table(title="registered models")
    for column in ("name", "latest", "task", "metric", "source", "registered", "conversions"):
        table.add_column(column)
    for model in latest.values():
        table.add_row(model.name, str(model.version), model.spec.task, model.spec.metric or "-", model.source_kind,
                      model.created_at, str(len(registry.conversions(model))))  # fmt: skip
    console.print(table)


@app.command()
@one_line_errors
def show(ref: str = typer.Argument(..., help="NAME or NAME@VERSION")) -> None:
    """Show a registered version: source, spec, budgets, lineage and its latest conversion."""
    registry = _registry()
    model = registry.get(*_split_ref(ref))
    spec = model.spec
    console.print(f"[bold]{model.ref}[/bold] registered {model.created_at}")
    console.print(f"source: {model.source_ref} ({model.source_kind}), sha256 {model.source_sha256}")
    console.print(f"eval: sha256 {model.eval_sha256}; calibration: sha256 {model.calibration_sha256 or '-'}")
    console.print("inputs: " + "; ".join(format_tensor_spec(t) for t in spec.inputs))
    console.print(f"task {spec.task}, metric {spec.metric}, calibration {spec.calibration_method}")
    if spec.readout is not None:
        console.print(f"the metric reads {spec.readout.describe()}", markup=False, highlight=False)
    if spec.llm is not None:
        console.print(f"gates and serving limits: {json.dumps(spec.llm, sort_keys=True)}", markup=False,
                      highlight=False)  # fmt: skip
    else:
        console.print("budgets: " + spec.budgets.describe(spec.metric_name), markup=False, highlight=False)
    console.print("tools: " + ", ".join(f"{k} {v}" for k, v in sorted(model.tool_versions.items())))
    conversions = registry.conversions(model)
    if conversions and spec.llm is not None:
        console.print(llm_table(model, conversions[-1].results))
    elif conversions:
        from converter.report import rich_table

        console.print(rich_table(model, conversions[-1].results))


@app.command()
@one_line_errors
def history(name: str = typer.Argument(..., help="Model name")) -> None:
    """Every registered version of a model, its conversions and publications."""
    registry = _registry()
    versions = registry.versions(name)
    if not versions:
        raise ConfigError(f"model {name} is not registered (see 'edgefleet-convert list')")
    table = Table(title=f"history of {name}")
    for column in ("version", "registered", "source sha256", "conversion", "variants passed/refused", "bundle sha256",
                   "published to"):  # fmt: skip
        table.add_column(column)
    for model in versions:
        conversions: list[Any] = list(registry.conversions(model)) or [None]
        for conversion in conversions:
            table.add_row(*_history_row(registry, model, conversion))
    console.print(table)


def _history_row(registry: Registry, model: ModelVersion, conversion: Any) -> list[str]:
    head = [str(model.version), model.created_at, model.source_sha256[:12]]
    if conversion is None:
        return head + ["-", "-", "-", "-"]
    passed = sum(r["status"] == "passed" for r in conversion.results)
    where = ", ".join(p["destination"] for p in registry.publications(conversion)) or "-"
    counts = f"{passed}/{len(conversion.results) - passed}"
    return head + [f"{conversion.number} ({conversion.created_at})", counts, conversion.bundle_sha256[:12], where]


@app.command()
@one_line_errors
def convert(
    ref: str = typer.Argument(..., help="NAME or NAME@VERSION"),
    targets: str = typer.Option("onnx,ort", help="Comma-separated targets: onnx, ort, tflite, coreml."),
    quantize: str = typer.Option(
        "auto", help="auto (each target's ladder) or a list, e.g. fp32,fp16,int8-dynamic,int8-static,int8-weight"
    ),
    strict: bool = typer.Option(False, help="Exit 3 if any requested precision was refused."),
) -> None:
    """Export, quantise and gate each variant, then build the bundle and the report."""
    from converter.convert import convert as do_convert
    from converter.convert import parse_quantize
    from converter.exporters import parse_targets
    from converter.report import rich_table, write_report

    registry = _registry()
    name, version = _split_ref(ref)
    found = registry.versions(name)
    if found and found[-1].spec.llm is not None:
        _convert_llm(registry, registry.get(name, version), targets, quantize)
        return
    chosen_targets = parse_targets(targets)
    precisions = parse_quantize(quantize, chosen_targets)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(f"converting {ref}", total=None)

        def step(message: str) -> None:
            progress.update(task, description=f"{ref}: {message}")

        outcome = do_convert(registry, name, version, chosen_targets, precisions, progress=step)
    console.print(rich_table(outcome.model, [r.to_dict() for r in outcome.results]))
    report = write_report(registry.home, outcome.model, outcome.conversion)
    console.print(f"bundle {outcome.bundle_path} (sha256 {outcome.conversion.bundle_sha256[:16]}...)")
    console.print(f"report {report}")
    refused = [r for r in outcome.results if r.status == "refused"]
    if strict and refused:
        raise GateFailedError(
            f"model {outcome.model.ref}, variant {refused[0].variant_id}: {'; '.join(refused[0].reasons)}"
        )


def _convert_llm(registry: Registry, model: ModelVersion, targets: str, quantize: str) -> None:
    """A language model: GGUF variants gated against the source (see converter.llm.convert)."""
    from converter.llm.convert import convert_llm, parse_precisions

    if targets not in ("onnx,ort", "gguf"):
        raise ConfigError(f"{model.ref} is a language model: its only target is gguf (got --targets {targets})")
    precisions = parse_precisions(quantize)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(f"converting {model.ref}", total=None)
        outcome = convert_llm(
            registry,
            model,
            precisions,
            progress=lambda message: progress.update(task, description=f"{model.ref}: {message}"),
        )
    console.print(llm_table(outcome.model, [r.to_dict() for r in outcome.results]))
    console.print(f"bundle {outcome.bundle_path} (sha256 {outcome.conversion.bundle_sha256[:16]}...)")


def llm_table(model: ModelVersion, results: list[dict[str, Any]]) -> Table:
    """Per GGUF variant: status, size, KL, top-1 agreement, perplexity ratio, speed, tensor types, imatrix, reasons."""
    table = Table(title=f"{model.ref}: GGUF variants against the source")
    for column in ("variant", "status", "size", "KL", "top-1", "ppl ratio", "TTFT ms", "tok/s", "tensor types",
                   "imatrix", "reasons"):  # fmt: skip
        table.add_column(column)
    for r in results:
        m = r["metrics"]
        types = ", ".join(f"{k} {v}" for k, v in m.get("tensor_types", {}).items())
        imatrix = f"{m['imatrix']['tokens']:,} tokens" if "imatrix" in m else "-"
        table.add_row(r["variant_id"], r["status"], f"{m.get('size_bytes', 0):,}", f"{m.get('kl_mean', 0):.5f}",
                      f"{m.get('top1_agreement', 0):.4f}", f"{m.get('ppl_ratio', 0):.4f}",
                      f"{m.get('ttft_ms', 0):.1f}", f"{m.get('tokens_per_s', 0):.0f}", types, imatrix,
                      "; ".join(r["reasons"]))  # fmt: skip
    return table


@app.command("register-llm")
@one_line_errors
def register_llm(
    name: str = typer.Argument(..., help="Model name (lowercase)."),
    source: Path = typer.Option(..., help="Hugging Face model directory (config.json, safetensors, tokenizer)."),
    eval_text: Path = typer.Option(..., "--eval-text", help="UTF-8 text the variants are scored on."),
    calibration_text: Path | None = typer.Option(None, "--calibration-text", help="UTF-8 calibration text."),
    max_kl: str | None = typer.Option(None, help="Mean KL bounds per precision, e.g. 'q8_0=0.005,q4_k_m=0.05'."),
    min_top1: str | None = typer.Option(None, help="Least top-token agreement per precision, e.g. 'q4_k_m=0.9'."),
    max_ppl_ratio: str | None = typer.Option(None, help="Largest perplexity ratio per precision, e.g. 'q4_k_m=1.05'."),
    max_size_bytes: int | None = typer.Option(None, help="Largest variant size in bytes."),
    min_tokens_per_s: float | None = typer.Option(None, help="Least decode speed on this workstation."),
    max_prompt_tokens: int = typer.Option(0, help="Serving: longest prompt (0: the context less max-new-tokens)."),
    max_new_tokens: int = typer.Option(256, help="Serving: most tokens one request generates."),
    max_generation_s: float = typer.Option(30.0, help="Serving: wall time of one generation, s."),
    deadline_ms: float | None = typer.Option(None, help="Serving: answer through the cloud past this TTFT, ms."),
) -> None:
    """Register a new immutable version of a Hugging Face causal language model (Llama family)."""
    from converter.llm.gates import LlmBudgets
    from converter.llm.register import LlmSettings
    from converter.llm.register import register_llm as do_register
    from converter.spec import ServingPolicy

    with about(f"{name} (new version)", "source"):
        defaults = LlmBudgets()
        budgets = LlmBudgets(
            max_kl={**defaults.max_kl, **_per_precision(max_kl, "--max-kl")},
            min_top1={**defaults.min_top1, **_per_precision(min_top1, "--min-top1")},
            max_ppl_ratio=_per_precision(max_ppl_ratio, "--max-ppl-ratio"),
            max_size_bytes=max_size_bytes, min_tokens_per_s=min_tokens_per_s,
        )  # fmt: skip
        settings = LlmSettings(budgets, max_prompt_tokens, max_new_tokens, max_generation_s)
        serving = ServingPolicy(deadline_ms=deadline_ms)
    model = do_register(_registry(), name, source, eval_text, calibration_text, settings, serving)
    console.print(f"registered {model.ref} (source sha256 {model.source_sha256[:16]}...)")


def _per_precision(text: str | None, option: str) -> dict[str, float]:
    """``'q8_0=0.005,q4_k_m=0.05'`` -> {precision: bound}."""
    from converter.llm.quantize import PRECISIONS

    if not text:
        return {}
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in (*PRECISIONS, "f32"):
            raise ConfigError(f"{option}: '{part}' is not PRECISION=NUMBER with PRECISION one of f32, "
                              f"{', '.join(PRECISIONS)}")  # fmt: skip
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"{option}: '{value}' is not a number") from None
    return out


@app.command()
@one_line_errors
def report(
    ref: str = typer.Argument(..., help="NAME or NAME@VERSION"),
    open_browser: bool = typer.Option(False, "--open", help="Open the HTML report in a browser."),
    conversion_number: int | None = typer.Option(None, "--conversion", help="A conversion number (default: latest)."),
) -> None:
    """Write (if needed) and print the path of a conversion's report (the latest by default)."""
    from converter.report import rich_table, write_report

    registry = _registry()
    model = registry.get(*_split_ref(ref))
    conversion = registry.latest_conversion(model, conversion_number)
    path = write_report(registry.home, model, conversion)
    console.print(rich_table(model, conversion.results))
    console.print(f"report {path}")
    if open_browser:
        webbrowser.open(path.as_uri())


# --- release commands: what the release key signs ------------------------------------------------------

RepoOption = typer.Option(None, "--repo", help="A local TUF repository directory (created on first use).")
ServerOption = typer.Option(None, "--server", help="Fleet server base URL.")
ApiKeyOption = typer.Option(None, "--api-key", envvar="EDGEFLEET_API_KEY", help="Admin API key for --server.")
YesOption = typer.Option(False, "--yes", "-y", help="Sign without asking (needed when not run in a terminal).")
JsonOption = typer.Option(False, "--json", help="Print the plan (and the outcome) as JSON.")


def _destination(home: Home, repo: Path | None, server: str | None, api_key: str | None) -> Any:
    from converter.publish import RepoDestination, ServerDestination

    if (repo is None) == (server is None):
        raise ConfigError("this needs exactly one of --repo DIR or --server URL")
    if server is not None:
        if not api_key:
            raise ConfigError("--server needs --api-key (or EDGEFLEET_API_KEY)")
        return ServerDestination(server, api_key)
    assert repo is not None
    return RepoDestination(home, repo)


def _show_plan(plan: Any) -> None:
    """The diff the release key is about to sign."""
    console.print(f"targets v{plan.version} for {plan.destination}:")
    if plan.from_server is not None:
        change = plan.from_server
        console.print(f"  signed elsewhere since this workstation's ledger (targets v{change.version}, verified with "
                      f"the release key): {len(change.added)} added, {len(change.removed)} removed")  # fmt: skip
        for path in change.added:
            console.print(f"    + {path}", markup=False)
        for path in change.removed:
            console.print(f"    - {path}", markup=False)
    for mark, paths in (("+", plan.added), ("-", plan.removed), ("~", plan.changed)):
        for path in paths:
            console.print(f"  {mark} {path}", markup=False)
    if not (plan.added or plan.removed or plan.changed):
        console.print("  no change to the list (re-signs it with a new expiry)")
    if plan.floors:
        console.print("  floors: " + ", ".join(f"{name} >= {v}" for name, v in sorted(plan.floors.items())))


def _confirmation(yes: bool, as_json: bool) -> Callable[[Any], bool]:
    """Show the plan, then sign only with --yes or the engineer's answer in a terminal."""
    import sys

    def confirm(plan: Any) -> bool:
        if not as_json:
            _show_plan(plan)
        if yes:
            return True
        if as_json or not sys.stdin.isatty():
            if as_json:
                console.print_json(json.dumps({"plan": plan.to_dict(), "signed": False}))
            raise ConfigError(f"targets v{plan.version} not signed: rerun with --yes to sign it as shown "
                              "(no terminal to ask in)")  # fmt: skip
        return typer.confirm(f"sign targets v{plan.version} with the release key?", default=False)

    return confirm


def _report(released: Any, as_json: bool, done: str, plots: list[str] | None = None) -> None:
    if as_json:
        answer = {"plan": released.plan.to_dict(), "signed": released.signed, "accepted": released.accepted}
        console.print_json(json.dumps(answer if plots is None else {**answer, "plots": plots}))
    elif not released.signed:
        err_console.print("nothing signed")
    else:
        console.print(done)
    if not released.signed:
        raise typer.Exit(1)


@app.command()
@one_line_errors
def publish(
    ref: str = typer.Argument(..., help="NAME or NAME@VERSION"),
    repo: Path | None = RepoOption,
    server: str | None = ServerOption,
    api_key: str | None = ApiKeyOption,
    conversion_number: int | None = typer.Option(None, "--conversion", help="A conversion number (default: latest)."),
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Sign a conversion's bundle (the latest by default) with the release key into a TUF repository or a server.

    The new targets version is built from this workstation's ledger and shown as a diff first. A fleet server
    also gets the conversion report's plots, unsigned, for its dashboard.
    """
    from converter.publish import publish_bundle

    registry = _registry()
    model = registry.get(*_split_ref(ref))
    conversion = registry.latest_conversion(model, conversion_number)
    bundle_dir = registry.home.conversion_dir(model.name, model.version, conversion.number) / "bundle"
    destination = _destination(registry.home, repo, server, api_key)
    try:
        released = publish_bundle(registry.home, destination, bundle_dir, _confirmation(yes, as_json))
        report_dir = registry.home.reports_dir(model.name, model.version) / f"conversion-{conversion.number}"
        plots = _upload_plots(destination, model, report_dir) if released.signed else None
    finally:
        destination.close()
    if released.signed:
        registry.record_publication(conversion, destination.name, released.accepted)
    listing = "".join(f"\n  {target}" for target in released.accepted)
    shown = f"\n  plots for the dashboard: {', '.join(plots)}" if plots else ""
    done = f"published {model.ref} to {destination.name}: {len(released.accepted)} targets{listing}{shown}"
    _report(released, as_json, done, plots)


def _upload_plots(destination: Any, model: ModelVersion, report_dir: Path) -> list[str] | None:
    """The report plots uploaded to a fleet server (None for a repository); a failure is a warning only."""
    from converter.publish import ServerDestination, upload_plots

    if not isinstance(destination, ServerDestination):
        return None
    try:
        return upload_plots(destination, model.name, model.version, report_dir)
    except EdgeFleetError as e:
        err_console.print(f"warning: published, but the report plots were not uploaded: {e}", markup=False)
        return []


@app.command()
@one_line_errors
def revoke(
    ref: str = typer.Argument(..., help="NAME@VERSION to revoke"),
    repo: Path | None = RepoOption,
    server: str | None = ServerOption,
    api_key: str | None = ApiKeyOption,
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Remove a published version from the signed targets: no device can fetch or install it again."""
    from converter.publish import revoke as do_revoke

    name, version = _split_ref(ref)
    if version is None:
        raise ConfigError(f"'{ref}': revoke needs NAME@VERSION")
    home = Home.from_env()
    destination = _destination(home, repo, server, api_key)
    try:
        released = do_revoke(home, destination, name, version, _confirmation(yes, as_json))
    finally:
        destination.close()
    _report(released, as_json, f"revoked {ref} in targets v{released.plan.version}")


@app.command()
@one_line_errors
def floor(
    ref: str = typer.Argument(..., help="NAME@VERSION: the oldest version devices may be directed to"),
    remove: bool = typer.Option(False, "--remove", help="Remove NAME's floor instead (give just NAME)."),
    repo: Path | None = RepoOption,
    server: str | None = ServerOption,
    api_key: str | None = ApiKeyOption,
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Sign a minimum version for a model: devices refuse to install anything older, whoever directs them."""
    from converter.publish import set_floor

    name, version = _split_ref(ref)
    if (version is None) != remove:
        raise ConfigError(f"'{ref}': give NAME@VERSION to set a floor, or NAME --remove to remove it")
    home = Home.from_env()
    destination = _destination(home, repo, server, api_key)
    try:
        released = set_floor(home, destination, name, version, _confirmation(yes, as_json))
    finally:
        destination.close()
    done = f"{name}: floor {version}" if version is not None else f"{name}: no floor"
    _report(released, as_json, f"{done} (targets v{released.plan.version})")


ledger_app = typer.Typer(help="This workstation's ledger of signed targets, shared with a team as a signed file.")
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("show")
@one_line_errors
def ledger_show(repo: Path | None = RepoOption, server: str | None = ServerOption, as_json: bool = JsonOption) -> None:
    """What this workstation signed for a destination (read locally; the server is not asked)."""
    from converter.trust import TrustStore, repo_destination, server_destination

    home = Home.from_env()
    if (repo is None) == (server is None):
        raise ConfigError("this needs exactly one of --repo DIR or --server URL")
    name = server_destination(server) if server is not None else repo_destination(repo or Path())
    ledger = TrustStore(home, name).ledger()
    if as_json:
        console.print_json(json.dumps(ledger.to_dict()))
        return
    console.print(f"{name}: targets v{ledger.targets_version}, {len(ledger.targets)} targets")
    for path, entry in sorted(ledger.targets.items()):
        console.print(f"  {path}  {entry['length']} bytes  (since v{entry.get('signed_in')})", markup=False)
    for name_, version in sorted(ledger.floors.items()):
        console.print(f"  floor {name_} >= {version}")


@ledger_app.command("export")
@one_line_errors
def ledger_export(
    out: Path = typer.Argument(..., help="File to write (JSON, signed by the targets key)."),
    repo: Path | None = RepoOption,
    server: str | None = ServerOption,
) -> None:
    """Write the ledger and root chain of a destination for a teammate, signed by the targets key."""
    from converter.publish import export_team_ledger
    from converter.trust import repo_destination, server_destination

    home = Home.from_env()
    if (repo is None) == (server is None):
        raise ConfigError("this needs exactly one of --repo DIR or --server URL")
    name = server_destination(server) if server is not None else repo_destination(repo or Path())
    export_team_ledger(home, name, out)
    console.print(f"ledger of {name} written to {out}")


@ledger_app.command("import")
@one_line_errors
def ledger_import(file: Path = typer.Argument(..., help="A teammate's 'ledger export' file.")) -> None:
    """Adopt a teammate's ledger (checked against the targets key and the pinned root)."""
    from converter.publish import import_team_ledger

    try:
        data = file.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {file}: {e.strerror}") from e
    destination, version = import_team_ledger(Home.from_env(), data)
    console.print(f"ledger of {destination} imported: targets v{version}")


def main() -> None:
    app()
