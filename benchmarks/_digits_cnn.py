"""The real digits CNN as the converter ships it, for benchmarks that must not hide behind a synthetic model.

Trains the small CNN on scikit-learn's digits (a few seconds, one thread), registers it with the
demo's input spec, labels and post-processing, converts it to ONNX fp32 and unpacks the signed-ready
bundle: the same manifest (drift baseline with image summaries, label map, golden cases) a device gets.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LABELS = [str(d) for d in range(10)]
POSTPROCESS = [{"op": "softmax", "tensor": "logits", "output": "probabilities"},
               {"op": "argmax", "tensor": "probabilities", "output": "class_index"},
               {"op": "label_map", "tensor": "class_index", "output": "label", "labels": LABELS}]  # fmt: skip


def digits_cnn_bundle(work: Path) -> tuple[Path, str]:
    """Build (once per ``work``) and unpack the digits CNN bundle; returns its directory and variant id."""
    from bundles.archive import open_bundle
    from converter.home import Home
    from converter.registry import Registry
    from tests.converter.conftest import train_digits_cnn
    from tests.converter.helpers import ok, register_cnn

    unpacked = work / "digits-bundle"
    if not unpacked.exists():
        cnn = train_digits_cnn(work / "train")
        home = work / "home"
        previous = os.environ.get("EDGEFLEET_HOME")
        os.environ["EDGEFLEET_HOME"] = str(home)
        try:
            (work / "labels.txt").write_text("\n".join(LABELS) + "\n")
            (work / "post.json").write_text(json.dumps(POSTPROCESS))
            register_cnn("digits", cnn, "--labels", work / "labels.txt", "--postprocess", work / "post.json",
                         "--max-latency-ratio", "10")  # fmt: skip
            ok("convert", "digits", "--targets", "onnx", "--quantize", "fp32")
            registry = Registry(Home(home))
            conversion = registry.latest_conversion(registry.get("digits"))
            archive = Home(home).conversion_dir("digits", 1, conversion.number) / conversion.bundle_file
        finally:
            if previous is None:
                os.environ.pop("EDGEFLEET_HOME", None)
            else:
                os.environ["EDGEFLEET_HOME"] = previous
        open_bundle(archive, unpacked)
    manifest = json.loads((unpacked / "manifest.json").read_text())
    return unpacked, str(manifest["variants"][0]["id"])
