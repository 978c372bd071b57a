"""Damaged model packages for the tests of what refuses them (predict, export, the service)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def with_nan_output(package: Path, folder: Path) -> Path:
    """A copy of `package` whose network gives NaN (its hash updated, as a careless edit would leave it): its
    BatchNorm running variances are negative, finite values that the load-time check of the weights lets through, and
    the square root of which is NaN. NaN or infinite weights themselves are refused when the package is loaded."""
    from safetensors.torch import load_file, save_file

    from alnus._io import file_sha256

    copy = Path(shutil.copytree(package, folder))
    tensors = load_file(copy / "weights.safetensors")
    for key in [k for k in tensors if k.endswith("running_var")]:
        tensors[key][:] = -1.0
    save_file(tensors, copy / "weights.safetensors")
    meta = json.loads((copy / "metadata.json").read_text())
    meta["weights_sha256"] = file_sha256(copy / "weights.safetensors")
    (copy / "metadata.json").write_text(json.dumps(meta))
    return copy
