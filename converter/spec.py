"""What a registration declares: input tensors, task, metric and budgets.

The user writes the input spec on the command line as ``"x: float32[-1,1,8,8]"`` (several inputs
separated by ``;``). A dynamic dimension is ``-1`` (validated at 1 and :data:`DEFAULT_DYNAMIC_MAX`)
or an explicit inclusive range ``1..64``. These dataclasses are stored as JSON in the registry, so
their ``to_dict`` keys are persisted names: stable and lowercase.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from bundles.errors import ConfigError, ManifestError
from bundles.manifest import DTYPES, TASKS, FeatureSpec, Step, TensorSpec
from converter.metrics import METRICS, metric
from converter.readout import Readout, Request

DEFAULT_DYNAMIC_MAX = 32
"""Upper end of a dynamic dimension declared as plain ``-1``: the batch size latency is measured at."""

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
PREFERENCES = ("speed", "size")
_DROP_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e(-?\d+))?\s*(%?)\s*$")

_TENSOR_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.:/-]*)\s*:\s*([a-z0-9]+)\s*\[([^\]]*)\]\s*$")
_RANGE_RE = re.compile(r"^(\d+)\.\.(\d+)$")


def parse_input_spec(text: str) -> tuple[TensorSpec, ...]:
    """Parse ``"x: float32[-1,1,8,8]; mask: int64[1..64]"`` into tensor specs (ConfigError if malformed)."""
    specs = tuple(_parse_one_tensor(part) for part in text.split(";") if part.strip())
    if not specs:
        raise ConfigError(f"input spec '{text}' declares no tensor (expected e.g. 'x: float32[-1,1,8,8]')")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"input spec '{text}' declares the same tensor twice")
    return specs


def _parse_one_tensor(text: str) -> TensorSpec:
    match = _TENSOR_RE.match(text)
    if not match:
        raise ConfigError(f"input spec '{text.strip()}' is not of the form 'name: dtype[d0,d1,...]'")
    name, dtype, dims_text = match.groups()
    if dtype not in DTYPES:
        raise ConfigError(f"input spec '{name}': dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    shape: list[int] = []
    ranges: dict[str, tuple[int, int]] = {}
    for index, dim in enumerate(d.strip() for d in dims_text.split(",") if d.strip()):
        shape.append(_parse_dim(name, index, dim, ranges))
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape), dim_ranges=ranges)


def _parse_dim(name: str, index: int, dim: str, ranges: dict[str, tuple[int, int]]) -> int:
    range_match = _RANGE_RE.match(dim)
    if range_match:
        low, high = int(range_match.group(1)), int(range_match.group(2))
        if not 0 < low <= high:
            raise ConfigError(f"input spec '{name}': dimension {index} range '{dim}' needs 0 < min <= max")
        ranges[str(index)] = (low, high)
        return -1
    if dim == "-1":
        ranges[str(index)] = (1, DEFAULT_DYNAMIC_MAX)
        return -1
    if not dim.isdigit() or int(dim) <= 0:
        raise ConfigError(f"input spec '{name}': dimension {index} '{dim}' is not a positive integer, -1 or a..b")
    return int(dim)


def format_tensor_spec(spec: TensorSpec) -> str:
    """The command-line form of a tensor spec (inverse of :func:`parse_input_spec` for one tensor)."""
    dims = []
    for index, dim in enumerate(spec.shape):
        low_high = spec.dim_ranges.get(str(index))
        dims.append(f"{low_high[0]}..{low_high[1]}" if low_high else str(dim))
    return f"{spec.name}: {spec.dtype}[{','.join(dims)}]"


def parse_drop(text: str) -> tuple[float, bool]:
    """``"0.01"`` -> (0.01, False): absolute, in the metric's unit; ``"2%"`` -> (0.02, True): of the source's value."""
    match = _DROP_RE.match(text)
    if not match:
        raise ConfigError(f"--max-drop '{text}' is not a number (0.01) or a percentage (2%)")
    number = float(match.group(1) + (f"e{match.group(2)}" if match.group(2) else ""))
    relative = bool(match.group(3))
    return (number / 100.0 if relative else number), relative


def format_drop(value: float, relative: bool) -> str:
    return f"{value * 100:g}%" if relative else f"{value:g}"


@dataclass(frozen=True)
class Budgets:
    """What a variant must meet to be published. ``None`` means "no limit" (or "the metric's default").

    ``max_drop`` is in the metric's own terms: absolute in its unit (0.01 = one accuracy point) or,
    with ``max_drop_relative``, a fraction of the source model's value (0.02 = 2 % more MAE). Left
    ``None``, the metric's default applies (:data:`converter.metrics.METRICS`).
    ``max_latency_ratio`` bounds a quantised variant's latency at batch 1 *and* at ``latency_batch``
    (the model's typical batch) against its float parent of the same target: 1.0 means "not
    slower", the default 1.1 leaves 10 % for timer noise on a busy host. With ``prefer="size"`` a
    slower variant is kept, with the reason recorded. ``min_top1_agreement``/``min_cosine`` bound
    parity with the source model.
    """

    max_drop: float | None = None
    max_drop_relative: bool = False
    max_latency_ms: float | None = None
    max_size_bytes: int | None = None
    max_latency_ratio: float = 1.1
    latency_batch: int = 32
    min_top1_agreement: float | None = None
    min_cosine: float | None = None
    max_abs_error_fp32: float = 1e-3
    max_memory_mb: float | None = None
    prefer: str = "speed"

    def __post_init__(self) -> None:
        if self.prefer not in PREFERENCES:
            raise ConfigError(f"--prefer '{self.prefer}' is not one of {', '.join(PREFERENCES)}")
        if self.max_drop is not None and self.max_drop < 0:
            raise ConfigError(f"--max-drop {self.max_drop} is negative")
        if self.max_latency_ratio <= 0 or self.latency_batch < 1:
            raise ConfigError("--max-latency-ratio must be positive and --latency-batch at least 1")

    def drop_budget(self, metric_name: str) -> tuple[float, bool]:
        """(value, relative): the registered ``max_drop``, else the metric's default."""
        if self.max_drop is not None:
            return self.max_drop, self.max_drop_relative
        return parse_drop(metric(metric_name).default_max_drop)

    def allowed_drop(self, metric_name: str, source_value: float) -> float:
        """The drop allowed in the metric's unit, given the source model's own value."""
        value, relative = self.drop_budget(metric_name)
        return value * abs(source_value) if relative else value

    def describe(self, metric_name: str) -> str:
        """``max_drop=2% (mae default), max_latency_ratio=1.1, ...``: the budgets as show and the report print them."""
        value, relative = self.drop_budget(metric_name)
        drop = format_drop(value, relative) + (f" ({metric_name} default)" if self.max_drop is None else "")
        others = [f"{k}={v}" for k, v in self.to_dict().items() if v is not None and not k.startswith("max_drop")]
        return ", ".join([f"max_drop={drop}", *others])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budgets:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class ServingPolicy:
    """How devices serve the model, recorded in the manifest's ``runtime_config`` (registration flags).

    ``deadline_ms``: past it the agent answers through its fallback chain; ``confidence_threshold``:
    a classification less confident than this falls back too; ``static_answer``: the chain's last
    resort (output name -> value or encoded tensor).
    """

    deadline_ms: float | None = None
    confidence_threshold: float | None = None
    static_answer: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.deadline_ms is not None and not self.deadline_ms > 0:
            raise ConfigError(f"--deadline-ms must be greater than 0, got {self.deadline_ms}")
        if self.confidence_threshold is not None and not 0 < self.confidence_threshold <= 1:
            raise ConfigError(f"--confidence-threshold must be in (0, 1], got {self.confidence_threshold}")
        if self.static_answer is not None and (not isinstance(self.static_answer, dict) or not self.static_answer):
            raise ConfigError("--static-answer must be a JSON object mapping output names to values")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingPolicy:
        return cls(data.get("deadline_ms"), data.get("confidence_threshold"), data.get("static_answer"))


@dataclass(frozen=True)
class ModelSpec:
    """Everything a registration declares besides the files themselves."""

    task: str
    inputs: tuple[TensorSpec, ...]
    metric: str | None
    """None until registration picks the default for the output's form."""
    budgets: Budgets = field(default_factory=Budgets)
    labels: tuple[str, ...] = ()
    features: tuple[dict[str, Any], ...] = ()
    preprocess: tuple[dict[str, Any], ...] = ()
    postprocess: tuple[dict[str, Any], ...] = ()
    calibration_method: str = "minmax"
    label_key: str = "y"
    request: Request = field(default_factory=Request)
    """What the user said about the readout (``--output``, ``--threshold``)."""
    readout: Readout | None = None
    """Which output the metric reads and how: inferred (or as requested) at registration."""
    random_init: bool = False
    serving: ServingPolicy = field(default_factory=ServingPolicy)
    llm: dict[str, Any] | None = None
    """A language model's gates and serving limits (:class:`converter.llm.register.LlmSettings`), else None."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task '{self.task}' is not one of {', '.join(TASKS)}")
        if self.metric is not None and self.metric not in METRICS:
            metric(self.metric)  # raises, listing the valid task/metric pairs
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"calibration method '{self.calibration_method}' is not one of {', '.join(CALIBRATION_METHODS)}"
            )
        self._check_manifest_parts()

    def _check_manifest_parts(self) -> None:
        """Steps and features go into the manifest as given: refuse what the manifest would refuse, now."""
        try:
            for step in self.preprocess + self.postprocess:
                Step.from_dict(step)
            for feature in self.features:
                FeatureSpec.from_dict(feature)
        except ManifestError as e:
            raise ConfigError(f"invalid processing step or feature: {e}") from e

    @property
    def metric_name(self) -> str:
        """The metric (registered versions always have one)."""
        if self.metric is None:
            raise ConfigError("the registration has no metric yet")
        return self.metric

    @property
    def higher_is_better(self) -> bool:
        return metric(self.metric_name).higher_is_better

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "inputs": [t.to_dict() for t in self.inputs],
            "metric": self.metric,
            "budgets": self.budgets.to_dict(),
            "labels": list(self.labels),
            "features": list(self.features),
            "preprocess": list(self.preprocess),
            "postprocess": list(self.postprocess),
            "calibration_method": self.calibration_method,
            "label_key": self.label_key,
            "request": self.request.to_dict(),
            "readout": None if self.readout is None else self.readout.to_dict(),
            "random_init": self.random_init,
            "serving": self.serving.to_dict(),
            "llm": self.llm,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            task=data["task"],
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            metric=data["metric"],
            budgets=Budgets.from_dict(data.get("budgets", {})),
            labels=tuple(data.get("labels", ())),
            features=tuple(data.get("features", ())),
            preprocess=tuple(data.get("preprocess", ())),
            postprocess=tuple(data.get("postprocess", ())),
            calibration_method=data.get("calibration_method", "minmax"),
            label_key=data.get("label_key", "y"),
            request=Request.from_dict(data.get("request") or {}),
            readout=Readout.from_dict(data["readout"]) if data.get("readout") else None,
            random_init=bool(data.get("random_init", False)),
            serving=ServingPolicy.from_dict(data.get("serving") or {}),
            llm=data.get("llm"),
        )
