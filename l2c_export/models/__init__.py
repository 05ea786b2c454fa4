"""Model families: what every stage needs to know about a kind of model, declared in one place per family.

A family (``dit/``, ``uvit/``) is one folder whose ``__init__`` defines a :class:`ModelFamily`; this registry maps its
name to it. Plan, export, build, manifest, runtime, backends, verify and bench read only a family's declaration or
the manifest a build wrote from it; none of them knows which family it handles. (The pattern: Optimum's
per-architecture ONNX export configs and TensorRT demo/Diffusion's ``BaseModel``.)

Adding a family: a folder with the model (a module whose ``forward_cached(*inputs, compute, cache)`` computes
sub-layer ``i`` where ``compute[i]`` and otherwise adds ``cache[i]``) and a :class:`ModelFamily` subclass as its
``FAMILY``; the registry (:data:`FAMILIES`) finds it (or :func:`register` at run time, as the tests' toy family does).
A diffusers transformer class is a smaller declaration still, one file of ``diffusers/``
(:mod:`l2c_export.models.diffusers.declaration`; docs/adding-a-family.md).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

from ..core.interface import (CLASSIFIER_FREE, CONDITIONING, CONDITIONING_KINDS, DEFAULT_SCALE_ARGUMENT, LABEL,
                              NCHW, TOKEN_MASK)

LATENT_SCALE = 0.18215  # the SD-VAE scale both DiT and U-ViT latents use


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the graph interface, the batch axis left out: ``shape`` is per sample, an axis that varies per
    request named by a string (``prompt_tokens``). ``role`` says what a runtime feeds or reads
    (:mod:`l2c_export.core.interface`): ``sample`` (x), ``time`` (the timestep, float), ``conditioning`` or
    ``output``. A conditioning input also says the pipeline ``argument`` it is fed from, its ``kind`` and, where
    guidance feeds the unconditional half from another argument, that ``negative`` partner; a token mask whose
    partner's token count may differ (the shorter half padded under mask 0) says ``pads_negative``."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    role: str
    argument: str | None = None
    kind: str | None = None
    negative: str | None = None
    pads_negative: bool = False

    def __post_init__(self):
        if self.pads_negative and not (self.kind == TOKEN_MASK and self.negative):
            raise ValueError(f"{self.name}: only a token mask with a negative partner pads the shorter half")
        if (self.role == CONDITIONING) != (self.argument is not None and self.kind in CONDITIONING_KINDS):
            raise ValueError(f"{self.name}: a conditioning input (and only one) has an argument and a kind of "
                             f"{', '.join(CONDITIONING_KINDS)}")

    def record(self) -> dict:
        """The manifest's tensor record."""
        record = {"name": self.name, "dtype": self.dtype, "shape": ["batch", *self.shape], "role": self.role}
        if self.role == CONDITIONING:
            record.update(argument=self.argument, kind=self.kind)
            if self.negative is not None:
                record["negative"] = self.negative
            if self.pads_negative:
                record["pads_negative"] = True
        return record


def label_input(name: str) -> TensorSpec:
    """A class-label input (int64 per sample), fed ``--labels`` and guided against the null class; the pipelines'
    argument name for it is ``class_labels``."""
    return TensorSpec(name, "int64", (), CONDITIONING, argument="class_labels", kind=LABEL)


class ModelFamily:
    """What the stages need of one model family. Subclasses set the class attributes and implement the methods."""

    name: str  # registry key, recorded in the manifest
    config_class: type  # the family's config dataclass
    model_names: tuple[str, ...]  # presets, e.g. DiT-XL/2
    default_sampler: str  # "ddim", "ddpm" or "dpm_solver_2s"
    default_cfg_scale: float  # uncond + s * (cond - uncond), the same meaning for every family
    latent_scale: float = LATENT_SCALE
    guidance_rule: str = CLASSIFIER_FREE  # how the scale acts (l2c_export.core.interface.GUIDANCE_RULES)
    scale_argument: str = DEFAULT_SCALE_ARGUMENT  # the pipeline's name for the scale
    latent_layout: str = NCHW  # how the sample's axes lie (l2c_export.core.interface.LATENT_LAYOUTS)
    macs_prompt_tokens: int | None = None  # a text model's prompt length that its MACs are counted at

    # -- configs and checkpoints -----------------------------------------------------------------------------------
    def owns(self, config) -> bool:
        """Whether ``config`` is one of this family's (its config class, unless the family says more)."""
        return isinstance(config, self.config_class)

    def weights_sha256(self, path: str | Path) -> str:
        """The digest of the weights at ``path`` that a build records (``model/weights_sha256``)."""
        from ..core.manifest import sha256_of

        return sha256_of(Path(path))

    def config_from_dict(self, data: Mapping):
        """The family's config from a dict (a ``model.json``'s or a manifest's), refusing fields it does not have."""
        return config_from_dict(self.config_class, data)

    def preset(self, model_name: str, image_size: int, num_classes: int):
        """The config of preset ``model_name`` for ``image_size`` pixels (latents at 1/8) and ``num_classes``."""
        raise NotImplementedError

    def create(self, config):
        """A model with this family's initialisation (random weights)."""
        raise NotImplementedError

    def load(self, path: str | Path, config):
        """The model of ``config`` with the weights of ``path`` (safe loading, clear errors), eval mode, fp32."""
        from .checkpoint import load_into

        return load_into(path, self.create(config))

    # -- sub-layers --------------------------------------------------------------------------------------------------
    def sublayer_names(self, config) -> tuple[str, ...]:
        """Every sub-layer's name in forward order: the schedule's columns and the cache slots. The authors' families:
        ``attn_l``, ``mlp_l`` for each of :meth:`num_layers` layers."""
        from ..core.plan import default_sublayer_names

        return default_sublayer_names(2 * self.num_layers(config))

    def num_layers(self, config) -> int:
        """Layers with an attention and an MLP sub-layer: the schedule has 2 * num_layers columns; sub-layer 2l (cache
        slot ``attn_l``) is layer l's attention, 2l + 1 (``mlp_l``) its MLP (:func:`l2c_export.core.plan.slot_name`)."""
        raise NotImplementedError

    def cached_shape(self, config) -> tuple[int, ...]:
        """Per-sample shape of a cached sub-layer output, (T, D)."""
        raise NotImplementedError

    def cached_shapes(self, config) -> tuple[tuple[int | str, ...], ...]:
        """Per-sample shape of each sub-layer's cached value, in :meth:`sublayer_names` order (every one
        :meth:`cached_shape` unless the family says otherwise; a size that varies per request is named by a string,
        as in :class:`TensorSpec`)."""
        return (tuple(self.cached_shape(config)),) * len(self.sublayer_names(config))

    def dim_ranges(self, config, max_prompt_tokens: int | None) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of each size the graph interface names besides the batch (a prompt's tokens), for
        TensorRT's optimisation profile; none by default."""
        return {}

    # -- graph interface ---------------------------------------------------------------------------------------------
    def graph_inputs(self, config) -> list[TensorSpec]:
        """The model inputs, in the order ``forward_cached`` takes them."""
        raise NotImplementedError

    def graph_output(self, config) -> TensorSpec:
        raise NotImplementedError

    def dummy_inputs(self, config, batch: int) -> tuple:
        """Torch tensors for tracing, one per :meth:`graph_inputs` entry."""
        import torch

        tensors = []
        for spec in self.graph_inputs(config):
            if spec.role == "time":
                tensors.append(torch.full((batch, *spec.shape), 500.0))
            elif spec.dtype == "int64":
                tensors.append(torch.zeros((batch, *spec.shape), dtype=torch.int64))
            else:
                tensors.append(torch.zeros((batch, *spec.shape)))
        return tuple(tensors)

    def export_context(self):
        """A context the ONNX trace runs in (where a family's modules need a traceable stand-in); none by default."""
        import contextlib

        return contextlib.nullcontext()

    # -- cost and sampling conventions -------------------------------------------------------------------------------
    def count_macs(self, config):
        """:class:`l2c_export.core.macs.MacCount` of one sample's forward."""
        raise NotImplementedError

    def macs_prompt_length(self, config) -> int | None:
        """A text model's prompt length (tokens) that :meth:`count_macs` counts ``config`` at; None for a label
        model."""
        return self.macs_prompt_tokens

    def guided_channels(self, config, guide_all: bool = False) -> int:
        """How many leading output channels classifier-free guidance mixes."""
        raise NotImplementedError

    def null_class(self, config) -> int | None:
        """The label of the unconditional half; labels 0 .. null_class - 1 are the classes (None: no label input)."""
        raise NotImplementedError

    def guidance_record(self, config) -> dict:
        """The manifest's guidance facts the family fixes: its rule, the pipeline's name for the scale and, for a
        label model, the null class (what :mod:`l2c_export.samplers.conditioning` reads beside the input records)."""
        record = {"rule": self.guidance_rule, "scale_argument": self.scale_argument}
        null_class = self.null_class(config)
        if null_class is not None:
            record["null_class"] = null_class
        return record

    @property
    def classifier_free(self) -> bool:
        """Whether guidance runs an unconditional half (a batch of 2n)."""
        from ..core.interface import BATCHED_RULES

        return self.guidance_rule in BATCHED_RULES

    def sampler_channels(self, config) -> int | None:
        """The leading channels of the guided model output the sampler takes; None: every channel (the authors'
        samplers read a learned sigma themselves)."""
        return None


def config_from_dict(cls, data: Mapping):
    """A model config dataclass from a dict, refusing fields it does not have (one rule for every family)."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; expected a subset of {sorted(known)}")
    return cls(**dict(data))


# Where families are declared: each sub-package of this package (``dit/``, ``uvit/``) and each module of
# ``diffusers/`` whose source defines ``FAMILY`` at its top level is one, named after it (``dit``; ``diffusers-`` and
# the module's name: ``diffusers/pixart.py`` is ``diffusers-pixart``). Adding a family is adding its file.
_PACKAGE = Path(__file__).resolve().parent
_DECLARES_FAMILY = re.compile(r"^FAMILY\s*[:=]", re.MULTILINE)


def _declared_families() -> dict[str, str]:
    """family name -> the module that declares it, found by reading the sources (nothing is imported)."""
    found = {}
    for init in sorted(_PACKAGE.glob("*/__init__.py")):
        if _DECLARES_FAMILY.search(init.read_text()):
            found[init.parent.name] = f"{__name__}.{init.parent.name}"
    for module in sorted((_PACKAGE / "diffusers").glob("*.py")):
        if module.stem != "__init__" and _DECLARES_FAMILY.search(module.read_text()):
            found[f"diffusers-{module.stem}"] = f"{__name__}.diffusers.{module.stem}"
    return found


FAMILIES = _declared_families()
_loaded: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> None:
    """Adds a family defined outside this package (a plug-in, or a test's toy family)."""
    _loaded[family.name] = family


def get_family(name: str) -> ModelFamily:
    if name not in _loaded:
        if name not in FAMILIES:
            known = sorted(set(FAMILIES) | set(_loaded))
            raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(known)}")
        family = importlib.import_module(FAMILIES[name]).FAMILY
        if family.name != name:
            raise AssertionError(f"{FAMILIES[name]} declares family {family.name!r}; its file makes it {name!r}")
        _loaded[name] = family
    return _loaded[name]


def all_families() -> list[ModelFamily]:
    return [get_family(name) for name in sorted(set(FAMILIES) | set(_loaded))]


def family_of_config(config) -> ModelFamily:
    """The family whose config class ``config`` is an instance of."""
    for family in all_families():
        if family.owns(config):
            return family
    raise ValueError(f"no registered model family has configs of type {type(config).__name__}")


def family_of_model(model_name: str) -> ModelFamily:
    """The family whose presets include ``model_name`` (DiT-XL/2, U-ViT-H/2, ...)."""
    for family in all_families():
        if model_name in family.model_names:
            return family
    names = [name for family in all_families() for name in family.model_names]
    raise ValueError(f"unknown model {model_name!r}; expected one of {', '.join(names)}")
