"""PyTorch sources: a factory function in a Python file plus a state dict, or a saved ExportedProgram.

``torch:train.py:make_model --weights cnn.pt`` copies ``train.py`` (which must be self-contained)
and the weights; loading imports the copy under a private module name, calls the factory and
loads the state dict. A factory without ``--weights`` is refused unless ``--random-init`` says the
factory's own initial weights are meant (the seed is fixed, so they are the same on every load).
``torch:model.pt2`` is a ``torch.export.save`` file.

Export uses torch 2.13's default dynamo exporter with ``external_data=False`` (the default writes
``.onnx`` + ``.onnx.data`` and a lone ``.onnx`` copy loses its weights) and declares the spec's
dynamic dimensions with their ranges.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConfigError, ConversionError
from converter.onnx_tools import first_line, save_canonical
from converter.spec import ModelSpec

EXTENSIONS = (".pt2",)
FACTORY_FILE = "factory.py"
WEIGHTS_FILE = "weights.pt"
PROGRAM_FILE = "model.pt2"


INIT_SEED = 0
"""The torch seed set before calling a factory: ``--random-init`` weights are the same on every load."""


def stage(ref: str, weights: Path | None, dest: Path, random_init: bool = False) -> list[str]:
    if ref.endswith(".pt2"):
        if weights is not None or random_init:
            raise ConfigError("a .pt2 ExportedProgram carries its own weights: drop --weights / --random-init")
        _copy(Path(ref), dest / PROGRAM_FILE, "ExportedProgram file")
        return [PROGRAM_FILE]
    file_name, sep, factory = ref.rpartition(":")
    if not sep or not file_name.endswith(".py") or not factory.isidentifier():
        raise ConfigError(f"torch source '{ref}' must be 'file.py:factory_function' or a .pt2 file")
    if weights is None and not random_init:
        raise ConfigError(
            f"the torch factory {factory}() needs --weights (its trained state dict); "
            "give --random-init to register the factory's initial weights on purpose"
        )
    if weights is not None and random_init:
        raise ConfigError("--weights and --random-init contradict each other: give one")
    _copy(Path(file_name), dest / FACTORY_FILE, "factory file")
    (dest / "factory.txt").write_text(factory + "\n")
    stored = [FACTORY_FILE, "factory.txt"]
    if weights is not None:
        _copy(weights, dest / WEIGHTS_FILE, "weights file")
        stored.append(WEIGHTS_FILE)
    return stored


def _copy(source: Path, dest: Path, what: str) -> None:
    if not source.is_file():
        raise ConfigError(f"{what} {source} does not exist")
    shutil.copyfile(source, dest)


class TorchSource:
    """An ``nn.Module`` in eval mode; inputs are passed positionally in spec order."""

    kind = "torch"

    class_values: tuple[str, ...] = ()

    def __init__(self, module: Any, spec: ModelSpec, exported: Any = None) -> None:
        self.module = module
        self.spec = spec
        self.exported = exported
        self.output_names: list[str] = []

    def check(self, feature_names: tuple[str, ...]) -> None:
        """Nothing to check before running: a torch module takes its inputs positionally, in spec order."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The reference outputs, computed on one thread: the golden cases hold them, and a sum split
        over another number of threads rounds differently, which would change the bundle's bytes."""
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in self.spec.inputs]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                result = self.module(*args)
        finally:
            torch.set_num_threads(threads)
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        names = _output_names(self.spec, len(outputs))
        return {name: value.detach().cpu().numpy() for name, value in zip(names, outputs, strict=True)}

    def export_onnx(self, out_path: Path) -> None:
        import torch

        example = tuple(torch.from_numpy(_example_input(s)) for s in self.spec.inputs)
        try:
            probe = self.predict({s.name: a.numpy() for s, a in zip(self.spec.inputs, example, strict=True)})
        except Exception as e:  # the example input has every dynamic dimension at 2 (or its minimum)
            shapes = ", ".join(f"{s.name} {list(a.shape)}" for s, a in zip(self.spec.inputs, example, strict=True))
            raise ConversionError(f"the model cannot run on the export's example input ({shapes}): "
                                  f"{type(e).__name__}: {first_line(e)}") from e  # fmt: skip
        target = self.exported if self.exported is not None else self.module
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" noise
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                program = torch.onnx.export(
                    target,
                    example,
                    dynamo=True,
                    external_data=False,
                    input_names=[s.name for s in self.spec.inputs],
                    output_names=list(probe),
                    dynamic_shapes=None if self.exported is not None else dynamic_shapes(self.spec),
                    optimize=True,
                )
                assert program is not None
                program.save(str(out_path), external_data=False)
        except Exception as e:
            raise ConversionError(f"torch.onnx.export failed: {type(e).__name__}: {first_line(e)}") from e
        _strip_debug_metadata(out_path)


def _strip_debug_metadata(path: Path) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, module paths, absolute file names).

    It is a large share of a small quantised file and it names paths of the build machine, which
    has no place in a shipped, reproducible model. The model is saved in canonical order.
    """
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    save_canonical(model, path)


def _output_names(spec: ModelSpec, count: int) -> list[str]:
    base = {"classification": "logits", "regression": "prediction", "embedding": "embedding"}.get(spec.task, "output")
    return [base] if count == 1 else [f"{base}_{i}" for i in range(count)]


def _example_input(spec: Any) -> np.ndarray:
    """A zero tensor of a valid shape; dynamic dims at 2 (or their minimum) so torch does not specialise them."""
    from bundles.tensors import numpy_dtype

    shape = []
    for index, dim in enumerate(spec.shape):
        low, high = spec.dim_ranges.get(str(index), (1, 1))
        shape.append(dim if dim != -1 else min(max(2, low), high))
    return np.zeros(shape, dtype=numpy_dtype(spec.dtype))


def dynamic_shapes(spec: ModelSpec) -> tuple[dict[int, Any], ...] | None:
    import torch

    per_input: list[dict[int, Any]] = []
    for tensor in spec.inputs:
        dims = {}
        for key, (low, high) in tensor.dim_ranges.items():
            dims[int(key)] = torch.export.Dim(f"{tensor.name}_d{key}", min=low, max=high)
        per_input.append(dims)
    return tuple(per_input) if any(per_input) else None


def load(files: list[Path], spec: ModelSpec) -> TorchSource:
    import torch

    if files[0].name == PROGRAM_FILE:
        try:
            program = torch.export.load(str(files[0]))
        except Exception as e:
            raise ConversionError(f"cannot load the ExportedProgram: {first_line(e)}") from e
        return TorchSource(program.module(), spec, exported=program)
    module = _call_factory(files[0], (files[0].parent / "factory.txt").read_text().strip())
    weights = files[0].parent / WEIGHTS_FILE
    if weights.exists():
        _load_weights(module, weights)
    module.eval()
    return TorchSource(module, spec)


def _call_factory(path: Path, factory: str) -> Any:
    import torch

    # Named after the file's content, not at random: exporters that keep module paths in tensor names
    # (litert-torch) then write the same bytes for the same registered file.
    module_name = f"edgefleet_factory_{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    try:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        assert loader_spec is not None and loader_spec.loader is not None
        py_module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = py_module  # dataclasses and pickling look the module up by name
        loader_spec.loader.exec_module(py_module)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            model = getattr(py_module, factory)()
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise ConversionError(f"the factory {factory}() failed: {type(e).__name__}: {first_line(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise ConversionError(f"the factory {factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_weights(module: Any, path: Path) -> None:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    except Exception as e:
        raise ConversionError(f"the weights file does not fit the model: {first_line(e)}") from e
