"""The evaluation's int8 rows (:mod:`l2c_export.demo.evaluate`): samples of an int8 build on ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.schedule import Schedule


def int8_samples(spec, learned: Schedule, sampler, request: dict, noise: np.ndarray) -> dict[str, np.ndarray]:
    """Samples of the int8 build (ONNX Runtime) of ``spec`` with ``learned``: full compute and the schedule, for
    ``request`` (the pipeline's ``labels`` or ``conditioning``)."""
    import tempfile

    from ..builder.build import BuildRequest, build
    from ..runtime.pipeline import L2CPipeline

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "int8"
        build(BuildRequest(spec=spec, schedule=learned, sampler=sampler, out_dir=folder, precision="int8"),
              progress=False)
        pipe = L2CPipeline.from_engine_dir(folder)
        return {"int8 full": pipe(**request, noise=noise, full=True).samples,
                "int8 l2c": pipe(**request, noise=noise).samples}
