"""Reading a quantized build's weights back (numpy): the inverse of :mod:`l2c_export.export.quantize`, which the
runtime's PyTorch backend and verification need without the exporter.
"""

from __future__ import annotations

import numpy as np


def dequantize(arrays: dict[str, np.ndarray], tensors: dict[str, dict]) -> dict[str, np.ndarray]:
    """The float32 weights an int8 build stands for: ``(q - zero_point) * scale`` per channel, under the parameter's
    own name and layout; the tensors that are not quantized weights pass through (activation scales included)."""
    out = {}
    consumed = set()
    for name, record in tensors.items():
        shape = [1] * arrays[name].ndim
        shape[record["axis"]] = -1
        scale = np.asarray(arrays[record["scale"]], dtype=np.float32).reshape(shape)
        zero = np.asarray(arrays[record["zero_point"]], dtype=np.float32).reshape(shape)
        weight = (np.asarray(arrays[name], dtype=np.float32) - zero) * scale
        out[record["of"]] = np.ascontiguousarray(weight.T if record["transposed"] else weight)
        consumed |= {name, record["scale"], record["zero_point"]}
    for name, array in arrays.items():
        if name not in consumed:
            out[name] = array
    return out
