"""``make demo``: the main job of edgefleet, end to end on embedded defaults, told on the terminal.

The story walks the user journeys (ML engineer, fleet admin, device) with the real command-line tools, each
command printed before it runs, so the demo doubles as a tutorial:

1. the ML engineer trains a small CNN on scikit-learn's digits, creates the offline release key,
   registers the model and converts it (ONNX, ORT format and TFLite, each target's quantisation
   ladder, every variant gated against the source in ONNX Runtime, or in LiteRT and tflite-runtime);
2. the fleet admin initialises and starts a fleet server (SQLite, loopback) and the engineer
   publishes the bundle, signed with the release key, into the server's TUF repository;
3. two devices enroll with a fleet token (one with ONNX Runtime, one a board with LiteRT only), are
   directed to the bundle, each fetches the manifest and only the variant validated for its runtime
   (ONNX on the first, TFLite on the second) through the TUF client, installs it into an A/B slot
   after its golden self-test, and serves predictions on its localhost Open Inference Protocol API;
4. the demo sends real test digits to both devices and prints what came back;
5. a faulty retrain (it forgot to normalise its inputs) passes every offline check, is published and
   rolled out with gates while an app keeps sending requests; the drift gate breaches and the fleet
   rolls the device back to the previous bundle by itself;
6. the fleet at scale: ``edgefleet-sim`` runs a few hundred simulated devices (the agent's real client
   code, many per process) against another fleet server: a good version rolled out in waves converges,
   a bad one is stopped at its first wave and rolled back; the report's path is printed.

Everything lives under ``demo-data/`` (recreated on every run); the server and the agent are
stopped at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from simulators.models.digits import TrainingOutputs

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("EDGEFLEET_DEMO_DIR", str(ROOT / "demo-data"))).resolve()
BIN = Path(sys.executable).parent
console = Console(highlight=False, width=max(100, shutil.get_terminal_size((120, 40)).columns))


TARGETS = "onnx,ort,tflite"
LITERT_DEVICE = "device-2"
"""A board with LiteRT only (``EDGEFLEET_AGENT_RUNTIMES=litert``): it runs the bundle's TFLite variant."""


class DemoFailed(RuntimeError):
    """A step of the demo did not do what it should; the message says which and why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def _show_command(args: Sequence[str]) -> None:
    shown = " ".join(a if " " not in a else f'"{a}"' for a in args)
    shown = shown.replace(str(WORK) + "/", "").replace(str(BIN) + "/", "")
    console.print(f"[bold cyan]$ {shown}[/]")


def run(args: Sequence[str], env: dict[str, str], *, quiet: bool = False) -> str:
    """Run a CLI step, print its command and output; a non-zero exit ends the demo with its message."""
    args = [_tool(args[0]), *args[1:]]
    _show_command(args)
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, check=False)
    output = (result.stdout + _meaningful_stderr(result.stderr)).rstrip()
    if result.returncode != 0:
        raise DemoFailed(f"'{' '.join(args[:3])}' exited {result.returncode}: {output[-2000:]}")
    if output and not quiet:
        console.print(output, markup=False, highlight=False)
    return result.stdout


def _meaningful_stderr(stderr: str) -> str:
    noise = ("UserWarning", "validated_self", "warnings.warn", "DeprecationWarning", "FutureWarning",
             "dev mode allows an insecure setting")  # fmt: skip
    lines = [line for line in stderr.splitlines() if line.strip() and not any(n in line for n in noise)]
    return ("\n" + "\n".join(lines)) if lines else ""


@contextmanager
def background(args: Sequence[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start a long-running CLI (server, agent) with its output in ``log``; always stop it afterwards."""
    args = [_tool(args[0]), *args[1:]]
    _show_command([*args, "&"])
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DemoFailed(f"{what}: the process exited with {proc.returncode}")
        try:
            value = check()
        except (httpx.HTTPError, OSError, ValueError):
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise DemoFailed(f"timed out after {timeout_s:.0f} s waiting for {what}")


def chapter(title: str) -> None:
    console.print()
    console.rule(f"[bold]{title}")


def _secret(pattern: str, output: str, what: str) -> str:
    match = re.search(pattern, output)
    if match is None:
        raise DemoFailed(f"could not find the {what} in the command's output")
    return match.group(0)


def train_model() -> tuple[TrainingOutputs, Path]:
    """Chapter 1a: train the digits CNN and write what ``register`` needs; returns it and the source file."""
    from simulators.models import digits

    chapter("1. ML engineer: train a small CNN on scikit-learn's digits")
    source = WORK / "workstation" / "digits_model.py"
    source.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(digits.__file__), source)
    budget_s = float(os.environ.get("EDGEFLEET_DEMO_TRAIN_S", "20"))
    with console.status(f"training for up to {budget_s:.0f} s ..."):
        outputs = digits.write_training_outputs(WORK / "workstation" / "data", budget_s=budget_s)
    console.print(f"trained SmallCNN: test accuracy {outputs.test_accuracy:.4f} on 450 held-out digits")
    return outputs, source


def convert_model(env: dict[str, str], trained: TrainingOutputs, source: Path) -> None:
    """Chapter 1b: keys, register, convert."""
    run(["edgefleet-convert", "keys", "init"], env)
    run(
        [
            "edgefleet-convert", "register", "digits",
            "--source", f"torch:{source}:make_model", "--weights", str(trained.weights),
            "--input", "x: float32[-1,1,8,8]", "--task", "classification", "--labels", str(trained.labels),
            "--eval", str(trained.eval), "--calibration", str(trained.calibration),
            "--metric", "accuracy", "--max-drop", "0.01",
        ],
        env,
    )  # fmt: skip
    run(["edgefleet-convert", "convert", "digits", "--targets", TARGETS, "--quantize", "auto"], env)


def start_server(env: dict[str, str]) -> tuple[dict[str, str], str]:
    """Chapter 2a: init the server; returns the server env and the admin API key."""
    chapter("2. Fleet admin: a fleet server on embedded defaults (SQLite, loopback)")
    port = _free_port()
    server_env = {
        **env,
        "EDGEFLEET_DATA_DIR": str(WORK / "server"),
        "EDGEFLEET_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "EDGEFLEET_PORT": str(port),
        "EDGEFLEET_HOST": "127.0.0.1",
        "EDGEFLEET_MODE": "dev",
        "EDGEFLEET_ROLLOUT_TICK_S": "1",
        "EDGEFLEET_TELEMETRY_WINDOW_S": "2",
        "EDGEFLEET_TELEMETRY_UPLOAD_INTERVAL_S": "2",
    }
    out = run(["edgefleet-server", "init", "--dev", "--public-url", f"http://127.0.0.1:{port}"], server_env)
    return server_env, _secret(r"efk_\S+", out, "admin API key")


def enroll_device(server_env: dict[str, str], url: str, name: str, runtimes: str = "") -> tuple[dict[str, str], int]:
    """Chapter 3a: a device enrolls with a fleet token; returns its env and localhost API port.

    ``runtimes`` limits the runtimes the agent offers and uses (``litert``: a board without ONNX Runtime).
    """
    out = run(["edgefleet-server", "enroll-token", "create", "--fleet", "lab", "--expires", "1d"], server_env)
    token = _secret(r"efe_\S+", out, "enrollment token")
    http_port = _free_port()
    device_env = {
        **os.environ,
        "EDGEFLEET_AGENT_STATE_DIR": str(WORK / name),
        "EDGEFLEET_AGENT_POLL_INTERVAL_S": "2",
        "EDGEFLEET_AGENT_JITTER_S": "0.5",
        "EDGEFLEET_AGENT_HTTP_PORT": str(http_port),
        "EDGEFLEET_AGENT_RUNTIMES": runtimes,
    }
    run(["edgefleet-agent", "enroll", "--server", url, "--token", token], device_env)
    return device_env, http_port


def group_devices(server_env: dict[str, str]) -> None:
    """Chapter 3b: put the enrolled devices into the group ``lab`` with a short poll interval for the demo."""
    out = run(["edgefleet-server", "devices", "list", "--json"], server_env, quiet=True)
    device_ids = re.findall(r'"(?:device_id|id)":\s*"([^"]+)"', out)
    if not device_ids:
        raise DemoFailed("the enrolled device is not listed by 'edgefleet-server devices list'")
    run(["edgefleet-server", "groups", "create", "lab"], server_env)
    run(["edgefleet-server", "groups", "add", "lab", *device_ids], server_env)
    run(["edgefleet-server", "groups", "set-poll", "lab", "2s"], server_env)


def direct_fleet(server_env: dict[str, str], version: int) -> None:
    """Chapter 3c: direct the lab group to the bundle with a one-wave rollout."""
    run(
        ["edgefleet-server", "rollout", "create", f"digits@{version}", "--to", "group:lab", "--waves", "100%",
         "--soak", "5s", "--jitter", "0s", "--gate", "error_rate<0.01"],
        server_env,
    )  # fmt: skip


def wait_until_serving(http_port: int, agent: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Chapter 3c: wait until the device serves the model on its localhost API."""
    base = f"http://127.0.0.1:{http_port}"

    def ready() -> dict[str, Any] | None:
        if httpx.get(f"{base}/v2/models/digits/ready", timeout=2).status_code != 200:
            return None
        return dict(httpx.get(f"{base}/v2/models/digits", timeout=2).json())

    with console.status("the device polls, downloads through TUF, verifies, stages, self-tests, commits ..."):
        return dict(wait_for("the device to install digits and report ready", ready, 180, agent))


def served_variant(http_port: int, target: str, runtime: str) -> str:
    """The variant the device's daemon serves for digits, checked to be a ``target`` variant run on ``runtime``."""
    status = httpx.get(f"http://127.0.0.1:{http_port}/edgefleet/status", timeout=5).json()
    served = status.get("models", {}).get("digits", {}).get("served") or {}
    variant, on = str(served.get("variant")), served.get("runtime")
    if not variant.startswith(f"{target}-") or on != runtime:
        raise DemoFailed(
            f"the device on port {http_port} serves {variant} on {on}, not a {target} variant on {runtime}"
        )
    return variant


def predict_on_device(http_port: int, eval_path: Path, count: int = 12, device: str = "device-1") -> float:
    """Chapter 4: send real held-out digits to the device's OIP endpoint; print answers and accuracy."""
    data = np.load(eval_path)
    x, y = data["x"][:count], data["y"][:count]
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    console.print(f"[bold cyan]$ curl -s localhost:{http_port}/v2/models/digits/infer -d '{{\"inputs\": [...]}}'[/]")
    response = httpx.post(f"http://127.0.0.1:{http_port}/v2/models/digits/infer", json=body, timeout=30)
    if response.status_code != 200:
        raise DemoFailed(f"inference failed with {response.status_code}: {response.text}")
    answer = response.json()
    predicted = _predicted_classes(answer, count)
    table = Table(title=f"{count} held-out digits through {device} (model {answer.get('model_version', '?')})")
    for column in ("digit", "true label", "device says", ""):
        table.add_column(column)
    for i in range(count):
        table.add_row(str(i), str(y[i]), str(predicted[i]), "ok" if predicted[i] == y[i] else "[red]wrong[/]")
    console.print(table)
    return float((predicted == y).mean())


def _predicted_classes(answer: dict[str, Any], count: int) -> np.ndarray:
    outputs = {o["name"]: o for o in answer.get("outputs", [])}
    for name in ("class_index", "label"):
        if name in outputs:
            classes: np.ndarray = np.asarray(outputs[name]["data"], dtype=np.int64)[:count]
            return classes
    first = next(iter(outputs.values()))
    scores = np.asarray(first["data"], dtype=np.float32).reshape(count, -1)
    return np.asarray(scores.argmax(axis=1), dtype=np.int64)


class App:
    """The app on the device: sends held-out digits to the localhost API in a loop and counts answers."""

    def __init__(self, http_port: int, images: np.ndarray) -> None:
        self.url = f"http://127.0.0.1:{http_port}/v2/models/digits/infer"
        self.images = images
        self.answers_by_version: dict[str, int] = {}
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> App:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            i = 0
            while not self._stop.is_set():
                image = self.images[i % len(self.images)][None]
                body = {"inputs": [{"name": "x", "shape": list(image.shape), "datatype": "FP32",
                                    "data": image.ravel().tolist()}]}  # fmt: skip
                self._send(client, body)
                i += 1
                self._stop.wait(0.02)

    def _send(self, client: httpx.Client, body: dict[str, Any]) -> None:
        try:
            response = client.post(self.url, json=body)
        except httpx.HTTPError:
            self.failures += 1
            return
        if response.status_code != 200:
            self.failures += 1
            return
        version = str(response.json().get("model_version", "?"))
        self.answers_by_version[version] = self.answers_by_version.get(version, 0) + 1


def rollout_state(server_env: dict[str, str], rollout_id: int) -> str:
    """The persisted state of a rollout, read with ``edgefleet-server rollout show --json``."""
    result = subprocess.run(
        [_tool("edgefleet-server"), "rollout", "show", str(rollout_id), "--json"],
        env=server_env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        return ""
    shown = json.loads(result.stdout)
    return str(shown.get("state") or shown.get("rollout", {}).get("state", ""))


def soak_and_complete(server_env: dict[str, str]) -> None:
    """Chapter 4b: with live traffic, the wave soaks, its gate passes on real numbers, the rollout completes."""
    with console.status("the app sends live requests; the device reports metric windows; the wave soaks ..."):
        state = wait_for("the rollout of digits@1 to finish", lambda: _stopped(server_env, 1), 300)
    run(["edgefleet-server", "rollout", "show", "1"], server_env)
    if state != "completed":
        raise DemoFailed(f"the rollout of digits@1 ended '{state}', expected completed")


def faulty_retrain(env: dict[str, str], source: Path) -> None:
    """Chapter 5a: a retrain that forgot to normalise its inputs; every offline check passes."""
    from simulators.models import digits

    chapter("5. A faulty retrain: the fleet stops it by itself")
    console.print(
        "The engineer retrains digits but forgets to normalise the pixels (0..16 instead of 0..1).\n"
        "The model is consistent with its own data, so registration, conversion and every gate pass."
    )
    budget_s = float(os.environ.get("EDGEFLEET_DEMO_TRAIN_S", "20"))
    with console.status("retraining ..."):
        v2 = digits.write_training_outputs(WORK / "workstation" / "data-v2", budget_s=budget_s, scale=1.0)
    console.print(f"retrained: test accuracy {v2.test_accuracy:.4f} on its own (unnormalised) held-out digits")
    run(
        [
            "edgefleet-convert", "register", "digits",
            "--source", f"torch:{source}:make_model", "--weights", str(v2.weights),
            "--input", "x: float32[-1,1,8,8]", "--task", "classification", "--labels", str(v2.labels),
            "--eval", str(v2.eval), "--calibration", str(v2.calibration), "--metric", "accuracy", "--max-drop", "0.01",
        ],
        env,
    )  # fmt: skip
    run(["edgefleet-convert", "convert", "digits", "--targets", TARGETS, "--quantize", "auto"], env, quiet=True)
    console.print("(conversion table omitted: every rung as in chapter 1)")


def stopped_by_the_fleet(env: dict[str, str], server_env: dict[str, str], url: str, api_key: str,
                         http_port: int, app: App) -> None:  # fmt: skip
    """Chapter 5b: publish v2, roll it out with gates; the drift gate breaches and the fleet rolls back."""
    run(["edgefleet-convert", "publish", "digits", "--server", url, "--api-key", api_key, "--yes"], env)
    run(
        ["edgefleet-server", "rollout", "create", "digits@2", "--to", "group:lab", "--waves", "100%",
         "--soak", "60s", "--jitter", "0s", "--gate", "error_rate<0.01 min=50", "--gate", "psi<0.2 min=100",
         "--on-breach", "rollback"],
        server_env, quiet=True,
    )  # fmt: skip
    with console.status("devices install v2 and report live metrics; the gates are evaluated every second ..."):
        state = wait_for("the rollout of digits@2 to stop", lambda: _stopped(server_env, 2), 300)
    run(["edgefleet-server", "rollout", "show", "2"], server_env)
    if state != "rolled_back":
        raise DemoFailed(f"the faulty rollout ended '{state}', expected rolled_back")

    def serves_v1() -> bool:
        metadata = httpx.get(f"http://127.0.0.1:{http_port}/v2/models/digits", timeout=2).json()
        return list(metadata.get("versions", [])) == ["1"]

    wait_for("the devices to serve digits v1 again", serves_v1, 120)
    run(["edgefleet-server", "drift", "digits"], server_env)
    answered = ", ".join(f"v{v}: {n}" for v, n in sorted(app.answers_by_version.items()))
    console.print(f"the app kept getting answers throughout ({answered}; failed requests: {app.failures})")


def _serves_v1(http_port: int) -> bool:
    metadata = httpx.get(f"http://127.0.0.1:{http_port}/v2/models/digits", timeout=2).json()
    return list(metadata.get("versions", [])) == ["1"]


def _answered(app: App) -> str:
    return ", ".join(f"v{v}: {n}" for v, n in sorted(app.answers_by_version.items())) + f"; failed {app.failures}"


def _stopped(server_env: dict[str, str], rollout_id: int) -> str | None:
    state = rollout_state(server_env, rollout_id)
    return state if state in ("rolled_back", "completed", "aborted", "paused") else None


def fleet_at_scale(env: dict[str, str]) -> Path:
    """Chapter 6: a simulated fleet of a few hundred devices, a wave rollout and a bad version stopped."""
    chapter("6. The fleet at scale: a few hundred simulated devices, waves, a bad version stopped")
    devices = os.environ.get("EDGEFLEET_DEMO_FLEET_DEVICES", "300")
    console.print(
        f"{devices} virtual devices run the agent's real client code (enrollment, ETag polls, TUF, telemetry)\n"
        "against a second fleet server: version 2 goes out in waves, version 3 errors on a fifth of its requests."
    )
    report = WORK / "fleet-report"
    scenario = ROOT / "simulators" / "scenarios" / "demo.toml"
    args = ["run", str(scenario), "--devices", devices, "--out", str(report), "--work-dir", str(WORK / "fleet")]
    _show_command(["edgefleet-sim", *args])
    tool = BIN / "edgefleet-sim"  # before the first re-install after an update, the module runs it as well
    command = [str(tool)] if tool.exists() else [sys.executable, "-m", "simulators.fleet.cli"]
    done = subprocess.run([*command, *args], env=env, cwd=ROOT, timeout=600, check=False)
    if done.returncode != 0:
        raise DemoFailed(f"the simulated fleet did not end as expected (edgefleet-sim exited {done.returncode})")
    return report / "report.html"


def story() -> None:
    """The whole demo; raises :class:`DemoFailed` with the failing step."""
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    env = {**os.environ, "EDGEFLEET_HOME": str(WORK / "workstation"), "PYTHONWARNINGS": "ignore", "COLUMNS": "120"}
    trained, source = train_model()
    convert_model(env, trained, source)
    server_env, api_key = start_server(env)
    url = server_env["EDGEFLEET_PUBLIC_URL"]
    with background(["edgefleet-server", "run"], server_env, WORK / "server.log") as server:
        wait_for("the fleet server to be ready", lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 60,
                 server)  # fmt: skip
        run(["edgefleet-convert", "publish", "digits", "--server", url, "--api-key", api_key, "--yes"], env)
        run(["edgefleet-server", "bundles", "list"], server_env)
        chapter("3. The devices: enroll, get directed, install through TUF, serve")
        device_env, http_port = enroll_device(server_env, url, "device-1", runtimes="onnxruntime")
        lite_env, lite_port = enroll_device(server_env, url, LITERT_DEVICE, runtimes="litert")
        group_devices(server_env)
        with (
            background(["edgefleet-agent", "run"], device_env, WORK / "agent.log") as agent,
            background(["edgefleet-agent", "run"], lite_env, WORK / "agent-litert.log") as lite_agent,
        ):
            direct_fleet(server_env, 1)
            metadata = wait_until_serving(http_port, agent)
            console.print(f"device-1 serves digits version {metadata.get('versions')} on localhost:{http_port}")
            wait_until_serving(lite_port, lite_agent)
            run(["edgefleet-agent", "status"], device_env)
            lite_variant = served_variant(lite_port, target="tflite", runtime="litert")
            console.print(f"{LITERT_DEVICE} is a board with LiteRT only: the server directed it to a TFLite variant")
            console.print(f"{LITERT_DEVICE} serves {lite_variant} on litert")
            run(["edgefleet-agent", "status"], lite_env)
            run(["edgefleet-server", "devices", "list", "--filter", "runtime=litert>=2.3"], server_env)
            chapter("4. The apps on the devices: predictions over the localhost Open Inference Protocol API")
            accuracy = predict_on_device(http_port, trained.eval)
            lite_accuracy = predict_on_device(lite_port, trained.eval, device=LITERT_DEVICE)
            images = np.load(trained.eval)["x"]
            with App(http_port, images) as app, App(lite_port, images) as lite_app:
                soak_and_complete(server_env)
                faulty_retrain(env, source)
                stopped_by_the_fleet(env, server_env, url, api_key, http_port, app)
                wait_for(f"{LITERT_DEVICE} to serve digits v1 again", lambda: _serves_v1(lite_port), 120)
                console.print(f"{LITERT_DEVICE} (TFLite) kept answering too ({_answered(lite_app)})")
            run(["edgefleet-agent", "status"], device_env)
            run(["edgefleet-agent", "status"], lite_env)
    fleet_report = fleet_at_scale(env)
    console.print(
        Panel.fit(
            f"verified prediction: the device answered {accuracy:.0%} of held-out digits correctly with a bundle\n"
            "it fetched through TUF, checked against the release key's signature and self-tested before use;\n"
            f"the LiteRT-only board answered {lite_accuracy:.0%} with the TFLite variant validated for its runtime.\n"
            "A faulty retrain that passed every offline check was stopped by its drift gate and rolled back\n"
            "by the fleet, while the app kept getting answers.\n"
            "A simulated fleet converged on a wave rollout and stopped a bad version at its first wave.\n"
            f"fleet report: {fleet_report}",
            title="demo finished",
            border_style="green",
        )
    )


def main() -> None:
    """Entry point of ``make demo`` and ``edgefleet-demo``."""
    try:
        story()
    except DemoFailed as e:
        console.print(f"[bold red]demo failed:[/] {e}")
        console.print(f"logs: {WORK}/server.log, {WORK}/agent.log, {WORK}/agent-litert.log")
        sys.exit(1)


if __name__ == "__main__":
    main()
