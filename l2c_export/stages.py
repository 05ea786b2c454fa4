"""The stages of the package, lowest first: a module imports only from its own stage or a lower one.

::

    core < samplers < models < routers < learn < export < builder < runtime < serving < tools < demo < cli

- ``core``: the manifest's and the schedule's vocabulary and checks (numpy, JSON); what both the builder and the
  runtime read (backend precisions, dequantization).
- ``samplers``: the denoising loop, the samplers' arithmetic and the checks of a request's conditioning (numpy).
- ``models``: the PyTorch model families, their checkpoints and the PyTorch reference sampler.
- ``routers``, ``learn``: L2C's routers and learning them; ``export``, ``builder``: ONNX export, quantization and
  the build folder.
- ``runtime``, ``serving``: running a build (numpy and ONNX Runtime or TensorRT) and serving it on Triton. They stand
  on ``core`` and ``samplers`` only (:data:`TORCH_FREE_STAGES`), except the PyTorch backend
  (:data:`TORCH_MODULES`), which is imported only when a caller asks for ``--backend torch``.
- ``tools``, ``demo``, ``cli``: verification, benchmarks, plots, the demo and the command line on top.

Within a stage any module may import any other, as long as no two import each other, directly or through others
of the same stage (the imports within a stage form no cycle; a module's import of its own package, e.g.
``from . import RouterLogits`` in ``routers/baselines.py``, and imports under ``if TYPE_CHECKING:``, which never
run, do not count). ``tests/test_imports.py`` walks every module's imports (top level and inside functions,
absolute and relative) and fails on one that climbs this order, on a torch-free module that imports PyTorch or a
stage that is not torch-free, and on a cycle within a stage.
"""

STAGES = ("core", "samplers", "models", "routers", "learn", "export", "builder", "runtime", "serving", "tools", "demo",
          "cli")

# The stages that run a build: they import only from one another, and PyTorch, diffusers or transformers never at the
# top of a module (a function reached only with torch tensors may, as samplers.guidance.apply_guidance does).
TORCH_FREE_STAGES = ("core", "samplers", "runtime", "serving")
# Modules of those stages that are PyTorch's (imported by name only when asked for, never at the top of a
# torch-free module): they may import from any lower-or-equal stage, as the order says.
TORCH_MODULES = ("l2c_export.runtime.backends.torch",)
