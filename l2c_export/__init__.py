"""l2c-export: Learning-to-Cache schedules carried into exported diffusion transformers.

The names a user needs first, importable from the package itself::

    from l2c_export import BuildRequest, L2CPipeline, build, embedded_default
    l2c_export.enable(pipe, "schedule.json")        # a live diffusers pipeline, in PyTorch; l2c_export.disable(pipe)
    router = l2c_export.learn(pipe, prompts=[...])  # a router learned from it

Each lives in its stage's module and is imported only when first used (PEP 562), so ``import l2c_export`` stays light:
no PyTorch is imported until a name that needs it is (``build``, ``verify_build``, the model specs' weights).
"""

from __future__ import annotations

import importlib
import os

# ONNX Runtime's telemetry off, as in the Triton server's environment (l2c_export.serving.triton): ONNX Runtime reads
# ORT_DISABLE_TELEMETRY when it is imported (after that, disable_telemetry_events() is too late to keep it from making
# its database under ~/.cache/Microsoft), and every stage that imports it imports this package first: the CLI, the
# Python API, Triton's model. An explicit ORT_DISABLE_TELEMETRY=0 in the environment is kept.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# name -> the module that defines it (one definition each; these are re-exports)
_EXPORTS = {
    # running a build (numpy and ONNX Runtime; no PyTorch)
    "L2CPipeline": "l2c_export.runtime.pipeline",
    "SampleResult": "l2c_export.runtime.pipeline",
    "load_manifest": "l2c_export.core.manifest",
    # models, schedules and routers
    "embedded_default": "l2c_export.models.zoo",
    "official": "l2c_export.models.zoo",
    "ModelSpec": "l2c_export.models.zoo",
    "Schedule": "l2c_export.core.schedule",
    "load_router": "l2c_export.routers",
    "schedule_for_mac_fraction": "l2c_export.routers.baselines",
    "create_sampler": "l2c_export.samplers",
    # building and checking
    "build": "l2c_export.builder.build",
    "BuildRequest": "l2c_export.builder.build",
    "BuildReport": "l2c_export.builder.build",
    "BatchRange": "l2c_export.builder.engines",
    "verify_build": "l2c_export.tools.verify",
    # a learned schedule on a live diffusers pipeline, in PyTorch (``learn``, the package l2c_export.learn, is callable)
    "enable": "l2c_export.learn.live",
    "disable": "l2c_export.learn.live",
}
_PACKAGES = {"learn": "l2c_export.learn"}  # exported names that are subpackages (callable ones)
_ALIASES = {"load_manifest": "load"}  # exported name -> its name in its module

__all__ = sorted([*_EXPORTS, *_PACKAGES])


def __getattr__(name: str):
    if name in _PACKAGES:
        return importlib.import_module(_PACKAGES[name])  # importing it sets it here
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'l2c_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
