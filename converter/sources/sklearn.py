"""scikit-learn sources: a pickled (or skops) estimator or pipeline, exported with skl2onnx.

Classifiers are exported without ZipMap where the converter has that option, so the ONNX outputs
are ``label`` (the class values: int64, or strings for a classifier trained on string labels) and
``probabilities`` (float32), the same names :meth:`SklearnSource.predict` gives the reference. A
classifier without ``predict_proba`` (``SVC()``, ``LinearSVC``) gives its decision function under
``probabilities``, laid out as skl2onnx lays out a binary decision ``d`` for that estimator: ``[d]``
(LinearSVC, RidgeClassifier), ``[-d, d]`` (SGDClassifier, Perceptron) or ``[d, -d]`` (SVC), found
by running the export once: the values stay scikit-learn's, so parity still compares the two.
Regressors give ``variable`` of shape [n, k].

The export is canonicalised (:func:`converter.onnx_tools.canonicalize`: skl2onnx writes its opset
list in hash order) and checked at registration (:meth:`SklearnSource.check`): an estimator
skl2onnx cannot convert (``HistGradientBoosting*`` with scikit-learn 1.9: a TypeError while
building the tree node) is refused there with one line naming it, and the spec's dtype, width and
(for models fitted on a DataFrame) feature names must be the model's.

Unpickling runs code from the file: register only models you trust (as with ``torch.load``).
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConfigError, ConversionError
from converter.onnx_tools import check_inputs_match_spec, first_line, make_session, run_session, save_canonical
from converter.spec import ModelSpec

EXTENSIONS = (".pkl", ".pickle", ".skops")
PICKLE_FILE = "model.pkl"
SKOPS_FILE = "model.skops"
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


def stage(ref: str, weights: Path | None, dest: Path, random_init: bool = False) -> list[str]:
    if weights is not None or random_init:
        raise ConfigError("a scikit-learn source carries its own fitted state: drop --weights / --random-init")
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
        from sklearn.base import is_classifier

        self.estimator = estimator
        self.spec = spec
        if len(spec.inputs) != 1 or len(spec.inputs[0].shape) != 2:
            raise ConfigError("a scikit-learn model takes one 2-D input, e.g. 'x: float32[-1,64]'")
        self.is_classifier = bool(is_classifier(estimator))
        _single_threaded(estimator)
        classes = getattr(estimator, "classes_", None) if self.is_classifier else None
        self.class_values: tuple[str, ...] = () if classes is None else tuple(_class_text(c) for c in classes)
        self._model: Any = None
        self._layout: str | None = None

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = inputs[self.spec.inputs[0].name]
        try:
            if self.is_classifier:
                return {"label": self._labels(features), "probabilities": self._scores(features)}
            values = np.asarray(self.estimator.predict(features), dtype=np.float32)
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"the scikit-learn model cannot predict: {first_line(e)}") from e
        return {"variable": values.reshape(len(features), -1)}

    def _labels(self, features: np.ndarray) -> np.ndarray:
        labels = np.asarray(self.estimator.predict(features))
        return labels.astype(np.int64) if labels.dtype.kind in "biu" else labels.astype(str).astype(object)

    def _scores(self, features: np.ndarray) -> np.ndarray:
        if hasattr(self.estimator, "predict_proba"):
            return np.asarray(self.estimator.predict_proba(features), dtype=np.float32)
        scores = np.asarray(self.estimator.decision_function(features), dtype=np.float32)
        return _BINARY_LAYOUTS[self._binary_layout(features, scores)](scores) if scores.ndim == 1 else scores

    def _binary_layout(self, features: np.ndarray, decision: np.ndarray) -> str:
        """Which of :data:`_BINARY_LAYOUTS` the export uses for this estimator (found once, on these rows)."""
        if self._layout is None:
            session = make_session(self._onnx().SerializeToString(), what="the scikit-learn export")
            exported = run_session(session, {self.spec.inputs[0].name: features})["probabilities"]
            gaps = {name: _gap(layout(decision), exported) for name, layout in _BINARY_LAYOUTS.items()}
            self._layout = min(gaps, key=lambda name: gaps[name])
        return self._layout

    def _onnx(self) -> Any:
        """The skl2onnx export, made once per loaded source."""
        if self._model is None:
            self._model = self._export()
        return self._model

    def _export(self) -> Any:
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType

        spec = self.spec.inputs[0]
        initial_types = [(spec.name, FloatTensorType([None, spec.shape[1]]))]
        try:
            try:
                options = {id(self.estimator): {"zipmap": False}} if self.is_classifier else None
                model = to_onnx(self.estimator, initial_types=initial_types, options=options, target_opset=TARGET_OPSET)
            except NameError:  # this converter has no zipmap option (LinearSVC): its outputs are tensors already
                model = to_onnx(self.estimator, initial_types=initial_types, target_opset=TARGET_OPSET)
        except Exception as e:
            raise ConversionError(
                f"skl2onnx {_version('skl2onnx')} cannot convert {type(self.estimator).__name__} "
                f"(scikit-learn {_version('scikit-learn')}): {_root_cause(e)}"
            ) from e
        return model

    def check(self, feature_names: tuple[str, ...]) -> None:
        """Refuse at registration what cannot be exported, and a spec or data that is not the model's."""
        model = self._onnx()
        check_inputs_match_spec(model, self.spec.inputs, "the scikit-learn model", error=ConfigError)
        fitted = tuple(str(n) for n in getattr(self.estimator, "feature_names_in_", ()))
        if fitted and feature_names and fitted != feature_names:
            raise ConfigError(
                f"the eval file's columns {list(feature_names)} are not the model's features {list(fitted)} "
                "(same names, same order)"
            )
        width = getattr(self.estimator, "n_features_in_", None)
        if width is not None and self.spec.inputs[0].shape[1] != width:
            raise ConfigError(f"input '{self.spec.inputs[0].name}' declares {self.spec.inputs[0].shape[1]} "
                              f"features, the model was fitted on {width}")  # fmt: skip

    def export_onnx(self, out_path: Path) -> None:
        save_canonical(self._onnx(), out_path)


_BINARY_LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "d": lambda d: d[:, None],
    "-d,d": lambda d: np.stack([-d, d], axis=1),
    "d,-d": lambda d: np.stack([d, -d], axis=1),
}


def _gap(candidate: np.ndarray, exported: np.ndarray) -> float:
    if candidate.shape != exported.shape:
        return float("inf")
    return float(np.max(np.abs(candidate.astype(np.float64) - exported)))


def _single_threaded(estimator: Any) -> None:
    """``n_jobs=1`` everywhere: a forest sums its trees' probabilities in the order its threads finish,
    so parallel predictions round differently from run to run (and the golden cases hold them)."""
    try:
        jobs = {key: 1 for key in estimator.get_params(deep=True) if key == "n_jobs" or key.endswith("__n_jobs")}
        if jobs:
            estimator.set_params(**jobs)
    except Exception:  # noqa: BLE001, S110 - an estimator without the usual params API just keeps its own
        pass


def _class_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


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
