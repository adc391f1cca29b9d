"""Runtime workers: tflite-runtime 2.14 in its own environment (numpy < 2), driven over pipes.

The worker runs the devices' own runtime code; what it cannot load is refused with the runtime's
words, a worker that dies mid-conversion is an error naming its last log lines, and a missing
environment says how to get one.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bundles.errors import ConversionError, RuntimeUnavailableError
from bundles.testing import make_tflite_classifier
from converter.workers import TFLITE_RUNTIME_PYTHON_ENV, RuntimeWorker, worker_python

X = np.random.default_rng(3).uniform(-2, 2, size=(5, 4)).astype(np.float32)


@pytest.fixture()
def worker(tmp_path: Path) -> Iterator[RuntimeWorker]:
    started = RuntimeWorker("tflite_runtime", tmp_path / "worker")
    yield started
    started.close()


def test_the_worker_runs_the_model_in_tflite_runtime_with_numpy_1(worker: RuntimeWorker, tmp_path: Path) -> None:
    model = make_tflite_classifier(tmp_path / "m.tflite", seed=4)
    assert worker.version == "2.14.0" and worker.numpy_version.startswith("1.")
    runner = worker.load("tflite", tmp_path / "m.tflite")
    np.testing.assert_allclose(runner.run({"x": X})["logits"], model.logits(X), atol=1e-5)
    times = runner.time_calls({"x": X[:1]}, calls=20, warmup=2, budget_s=0.1)
    assert 10 <= len(times) <= 20 and all(0 < t < 0.1 for t in times)
    assert runner.peak_rss_delta_bytes() >= 0
    assert not list((worker.work_dir).glob("io-*")), "array files are removed after each call"


def test_a_file_the_old_runtime_cannot_load_is_refused_with_its_words(worker: RuntimeWorker, tmp_path: Path) -> None:
    (tmp_path / "bad.tflite").write_bytes(b"TFL3 not a model")
    with pytest.raises(RuntimeUnavailableError, match="tflite_runtime cannot load bad.tflite"):
        worker.load("tflite", tmp_path / "bad.tflite")
    make_tflite_classifier(tmp_path / "m.tflite", seed=4)
    assert worker.load("tflite", tmp_path / "m.tflite").run({"x": X})["logits"].shape == (5, 3)  # still serving


def test_a_worker_that_dies_is_an_error_naming_its_log(worker: RuntimeWorker, tmp_path: Path) -> None:
    make_tflite_classifier(tmp_path / "m.tflite", seed=4)
    runner = worker.load("tflite", tmp_path / "m.tflite")
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait()
    with pytest.raises(ConversionError, match="the tflite_runtime worker (is gone|did not answer)"):
        runner.run({"x": X})


def test_a_missing_environment_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TFLITE_RUNTIME_PYTHON_ENV, str(tmp_path / "python"))
    with pytest.raises(RuntimeUnavailableError, match="run scripts/setup.sh or set EDGEFLEET_TFLITE_RUNTIME_PYTHON"):
        worker_python("tflite_runtime")
    (tmp_path / "python").symlink_to("/bin/true")  # a python without tflite-runtime (answers nothing)
    # /bin/true exits at once: the hello is written to a pipe whose reader is gone ("is gone"), or before
    # it exits and then read as nothing ("did not answer"), as the two processes' timing falls
    with pytest.raises(RuntimeUnavailableError, match="the tflite_runtime worker (did not answer|is gone)"):
        RuntimeWorker("tflite_runtime", tmp_path / "w")
