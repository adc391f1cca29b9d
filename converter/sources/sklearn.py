"""scikit-learn sources: a pickled (or skops) estimator, exported with skl2onnx.

Classifiers are exported without ZipMap, so the ONNX outputs are ``label`` (int64) and
``probabilities`` (float32), the same names :meth:`SklearnSource.predict` gives the reference;
regressors give ``variable`` of shape [n, 1]. skl2onnx fails deep inside on some estimators
(HistGradientBoosting with scikit-learn 1.9 raises a TypeError while building the tree node):
any exporter failure becomes one ConversionError naming the estimator.

Unpickling runs code from the file: register only models you trust (as with ``torch.load``).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConfigError, ConversionError
from converter.onnx_tools import first_line
from converter.spec import ModelSpec

EXTENSIONS = (".pkl", ".pickle", ".skops")
PICKLE_FILE = "model.pkl"
SKOPS_FILE = "model.skops"
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


def stage(ref: str, weights: Path | None, dest: Path) -> list[str]:
    if weights is not None:
        raise ConfigError("a scikit-learn source carries its own weights: drop --weights")
    path = Path(ref)
    if not path.is_file():
        raise ConfigError(f"scikit-learn model file {path} does not exist")
    stored = SKOPS_FILE if path.suffix == ".skops" else PICKLE_FILE
    shutil.copyfile(path, dest / stored)
    return [stored]


class SklearnSource:
    """A fitted estimator with one 2-D float input."""

    kind = "sklearn"

    def __init__(self, estimator: Any, spec: ModelSpec) -> None:
        self.estimator = estimator
        self.spec = spec
        if len(spec.inputs) != 1 or len(spec.inputs[0].shape) != 2:
            raise ConfigError("a scikit-learn model takes one 2-D input, e.g. 'x: float32[-1,64]'")
        self.is_classifier = hasattr(estimator, "predict_proba")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = inputs[self.spec.inputs[0].name]
        try:
            if self.is_classifier:
                labels = np.asarray(self.estimator.predict(features)).astype(np.int64)
                probabilities = np.asarray(self.estimator.predict_proba(features), dtype=np.float32)
                return {"label": labels, "probabilities": probabilities}
            values = np.asarray(self.estimator.predict(features), dtype=np.float32)
        except Exception as e:
            raise ConversionError(f"the scikit-learn model cannot predict: {first_line(e)}") from e
        return {"variable": values.reshape(len(features), -1)}

    def export_onnx(self, out_path: Path) -> None:
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType

        spec = self.spec.inputs[0]
        initial_types = [(spec.name, FloatTensorType([None, spec.shape[1]]))]
        options = {id(self.estimator): {"zipmap": False}} if self.is_classifier else None
        try:
            model = to_onnx(self.estimator, initial_types=initial_types, options=options, target_opset=TARGET_OPSET)
        except Exception as e:
            name = type(self.estimator).__name__
            raise ConversionError(
                f"skl2onnx cannot convert {name} ({type(e).__name__}: {first_line(e)}; cause: {_root_cause(e)})"
            ) from e
        out_path.write_bytes(model.SerializeToString())


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return f"{type(error).__name__}: {first_line(error)}"


def load(files: list[Path], spec: ModelSpec) -> SklearnSource:
    path = files[0]
    try:
        if path.name == SKOPS_FILE:
            estimator = _load_skops(path)
        else:
            with path.open("rb") as f:
                estimator = pickle.load(f)  # noqa: S301 - the user's own model file, see module docstring
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"cannot unpickle the scikit-learn model: {type(e).__name__}: {first_line(e)}") from e
    if not hasattr(estimator, "predict"):
        raise ConversionError(f"the pickled object is a {type(estimator).__name__}, not a scikit-learn estimator")
    return SklearnSource(estimator, spec)


def _load_skops(path: Path) -> Any:
    try:
        import skops.io as sio  # type: ignore[import-not-found]
    except ImportError as e:
        raise ConversionError("a .skops model needs the 'skops' package, which is not installed") from e
    return sio.load(path, trusted=sio.get_untrusted_types(file=path))
