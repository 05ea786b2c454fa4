"""TensorRT's ONNX parser support matrix (onnx/onnx-tensorrt ``docs/operators.md``, TensorRT 10, Apache-2.0).

The package ships the parsed matrix (``l2c_export/data/tensorrt_onnx_ops.json``: op -> supported types) so that a
graph can be checked where ``../shared`` is absent; :func:`parse_support_matrix` regenerates it from the markdown.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "tensorrt_onnx_ops.json"
_ROW = re.compile(r"^\|\s*([A-Za-z][A-Za-z0-9_]*)\s*\|\s*([YN])\s*\|([^|]*)")


def parse_support_matrix(markdown: str) -> dict[str, list[str]]:
    """The supported ops ("Y" rows) of the matrix and their supported types."""
    supported = {}
    for line in markdown.splitlines():
        match = _ROW.match(line)
        if match and match.group(1) != "Operator" and match.group(2) == "Y":
            supported[match.group(1)] = [t.strip() for t in match.group(3).split(",") if t.strip()]
    return supported


@lru_cache(maxsize=1)
def tensorrt_supported_ops() -> dict[str, list[str]]:
    return json.loads(SHIPPED.read_text())
