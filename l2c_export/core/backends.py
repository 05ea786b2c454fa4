"""What the builder and the runtime agree on about backends: which precisions each runs, and the error for a backend
this machine cannot run. Light (no ONNX Runtime, TensorRT or PyTorch), so the command line and the runtime import it
without the builder.
"""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """The backend cannot run on this machine; the message says what is missing and what to do."""


# The precisions each backend runs. ONNX Runtime has no bfloat16 kernels for these graphs (bf16 graphs are meant for
# TensorRT, which is strongly typed); fp8 runs there only unfused, as Q/DQ.
BACKEND_PRECISIONS = {"onnxruntime": ("fp32", "fp16", "int8", "fp8"),
                      "tensorrt": ("fp32", "fp16", "bf16", "int8", "fp8")}


def precision_refusal(backend: str, precision: str) -> str | None:
    """Why ``backend`` cannot run graphs of ``precision`` (None when it can): which backends take that precision."""
    if precision in BACKEND_PRECISIONS.get(backend, (precision,)):
        return None
    takers = [name for name, precisions in BACKEND_PRECISIONS.items() if precision in precisions]
    return (f"{backend} cannot run {precision} graphs; {precision} is for --backend {' or '.join(takers)} only "
            f"({backend} takes {', '.join(BACKEND_PRECISIONS[backend])})")
