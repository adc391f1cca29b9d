"""The parent side of runtime workers: gating a variant on a runtime that lives in another environment.

tflite-runtime 2.14 (what devices stuck on numpy < 2 run) cannot be imported beside the
converter's numpy 2, so it gets its own small environment, built by ``scripts/setup.sh`` in
``.venv-tflite214`` and found through ``EDGEFLEET_TFLITE_RUNTIME_PYTHON`` (the environment's
``python``) or, by default, ``.venv-tflite214/bin/python`` beside this checkout. One
:class:`RuntimeWorker` process per conversion and runtime (``python -m converter.runtime_worker``
there, this checkout on ``PYTHONPATH``) loads the variants with the devices' own runtime code;
a :class:`WorkerRunner` is a variant loaded there and offers what the gates need: ``run``, and
``time_calls`` / ``peak_rss_delta_bytes`` measured inside the worker (a pipe round trip would
otherwise be timed with the model).

A runtime whose environment is missing is *unavailable* (the variants are not validated there,
and the report says why); a worker that dies or hangs is a :class:`ConversionError` naming the
last lines of its log.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConversionError, RuntimeUnavailableError

TFLITE_RUNTIME_PYTHON_ENV = "EDGEFLEET_TFLITE_RUNTIME_PYTHON"
TFLITE_RUNTIME_VENV = ".venv-tflite214"
REPO_ROOT = Path(__file__).resolve().parents[1]
_REPLY_TIMEOUT_S = 300.0

_ENVIRONMENTS = {"tflite_runtime": (TFLITE_RUNTIME_PYTHON_ENV, TFLITE_RUNTIME_VENV, "tflite-runtime")}
"""Runtime name -> (the setting naming its python, the default environment beside the checkout, its distribution)."""


def worker_python(runtime: str) -> Path:
    """The python of ``runtime``'s environment; :class:`RuntimeUnavailableError` saying how to get one."""
    setting, venv, _ = _ENVIRONMENTS[runtime]
    named = os.environ.get(setting)
    path = Path(named).expanduser() if named else REPO_ROOT / venv / "bin" / "python"
    if not path.exists():
        origin = f"{setting}={named}" if named else f"the default {path}"
        raise RuntimeUnavailableError(
            f"no {runtime} environment ({origin} does not exist): run scripts/setup.sh or set {setting}"
        )
    return path


class RuntimeWorker:
    """One worker process of one runtime; requests are answered in order."""

    def __init__(self, runtime: str, work_dir: Path) -> None:
        self.runtime = runtime
        self.work_dir = work_dir.resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = work_dir / "worker.log"
        self._counter = itertools.count()
        python = worker_python(runtime)
        env = {"PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
               "PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(python), "-m", "converter.runtime_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, cwd=work_dir, env=env, text=True, bufsize=1,
            )  # fmt: skip
        hello = self.call({"op": "hello", "distributions": [_ENVIRONMENTS[runtime][2]]}, unavailable=True)
        self.version: str = hello["versions"].get(_ENVIRONMENTS[runtime][2], "")
        if not self.version:
            self.close()
            raise RuntimeUnavailableError(f"the {runtime} environment at {python} has no {_ENVIRONMENTS[runtime][2]}")
        self.numpy_version: str = hello["numpy"]

    def call(self, request: dict[str, Any], unavailable: bool = False) -> dict[str, Any]:
        """Send one request and wait for its reply; failures become ConversionError (or RuntimeUnavailableError)."""
        error_type: type[Exception] = RuntimeUnavailableError if unavailable else ConversionError
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(json.dumps(request) + "\n")
            stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise error_type(f"the {self.runtime} worker is gone: {self._log_tail()}") from e
        ready, _, _ = select.select([stdout], [], [], _REPLY_TIMEOUT_S)
        line = stdout.readline() if ready else ""
        if not line:
            self.close()
            raise error_type(f"the {self.runtime} worker did not answer ({request['op']}): {self._log_tail()}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            error = str(reply.get("error", "unknown error"))
            raise error_type(error if error.startswith(self.runtime) else f"{self.runtime}: {error}")
        return reply

    def load(self, target: str, path: Path, threads: int = 1) -> WorkerRunner:
        handle = f"m{next(self._counter)}"
        request = {"op": "load", "handle": handle, "target": target, "runtime": self.runtime,
                   "path": str(path.resolve()), "threads": threads}  # fmt: skip
        try:
            self.call(request)
        except ConversionError as e:
            raise RuntimeUnavailableError(str(e)) from e
        return WorkerRunner(self, handle)

    def arrays_dir(self) -> Path:
        folder = self.work_dir / f"io-{next(self._counter)}"
        folder.mkdir()
        return folder

    def _log_tail(self) -> str:
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        return " | ".join(lines[-3:])[-500:] or "no output"

    def close(self) -> None:
        if self.process.poll() is None:
            if self.process.stdin is not None:
                self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


class WorkerRunner:
    """A variant loaded in a worker: the gates' runner, timed and measured inside the worker."""

    def __init__(self, worker: RuntimeWorker, handle: str) -> None:
        self.worker = worker
        self.handle = handle

    def _write_feeds(self, feeds: dict[str, np.ndarray]) -> tuple[Path, dict[str, str]]:
        folder = self.worker.arrays_dir()
        paths = {}
        for index, (name, value) in enumerate(feeds.items()):
            path = folder / f"in-{index}.npy"
            np.save(path, np.ascontiguousarray(value), allow_pickle=False)
            paths[name] = str(path)
        return folder, paths

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        folder, paths = self._write_feeds(feeds)
        reply = self.worker.call({"op": "run", "handle": self.handle, "feeds": paths, "out_dir": str(folder)})
        outputs = {name: np.load(path, allow_pickle=False) for name, path in reply["outputs"].items()}
        _remove(folder)
        return outputs

    def time_calls(self, feeds: dict[str, np.ndarray], calls: int, warmup: int, budget_s: float) -> list[float]:
        folder, paths = self._write_feeds(feeds)
        request = {"op": "time", "handle": self.handle, "feeds": paths, "calls": calls, "warmup": warmup,
                   "budget_s": budget_s}  # fmt: skip
        times = [float(t) for t in self.worker.call(request)["times"]]
        _remove(folder)
        return times

    def peak_rss_delta_bytes(self) -> int:
        return int(self.worker.call({"op": "memory", "handle": self.handle})["peak_rss_delta_bytes"])

    def close(self) -> None:
        if self.worker.process.poll() is None:
            self.worker.call({"op": "close", "handle": self.handle})


def _remove(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
