"""The cache wrapper around a diffusers transformer: each named sub-module either runs and hands its output to the
request's cache, or returns the cached value; everything else in the block (norms, modulation, gates, residual adds)
runs every call exactly as diffusers wrote it. Torch is imported on first use, so importing this module needs none.
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .family import DiffusersConfig, DiffusersFamily


class _CacheState:
    """What the wrapped sub-modules of one cached transformer read during a call: which sub-layers compute (None:
    all), the request's cache (sub-layer index -> output, or None: keep nothing), and for the soft-routed forward the
    weights (num_sublayers,) and where fresh outputs go. Per thread, so that requests in several threads (the torch
    backend serving them) never see each other's; a deep copy (the exporter's stand-in) gets a state of its own."""

    _FIELDS = ("compute", "cache", "weights", "fresh")

    def __init__(self):
        object.__setattr__(self, "_local", threading.local())

    def __getattr__(self, name: str):
        if name not in self._FIELDS:
            raise AttributeError(name)
        return getattr(self._local, name, None)

    def __setattr__(self, name: str, value) -> None:
        if name not in self._FIELDS:
            raise AttributeError(name)
        setattr(self._local, name, value)

    def __deepcopy__(self, memo) -> "_CacheState":
        return _CacheState()


class OutputPacking:
    """How a sub-module's output becomes the one tensor its cache slot holds, and back: ``pack(output, args,
    kwargs)`` -> (N, T', D') and ``unpack(value, args, kwargs)`` -> what the block consumes in place of the module's
    output (``args``/``kwargs``: the module's call arguments). A family declares one where a module returns a tuple
    (joint attention's two streams) or where the cached value is more than the module's output (a branch's share of
    a linear map after it); without one the cached value is the output itself."""

    def pack(self, output, args, kwargs):
        raise NotImplementedError

    def unpack(self, value, args, kwargs):
        raise NotImplementedError

    def macs(self, value) -> int:
        """MACs that packing adds to the module's own (a share of a linear map: FLUX.1's single-stream blocks)."""
        return 0


def _cached_forward(module, *args, **kwargs):
    """The forward of a named sub-module: its own (the class's) forward, its output (packed, where the family
    declares an :class:`OutputPacking`) kept as the sub-layer's fresh value; where this call reuses it, the cached
    value instead; soft-routed, ``w * fresh + (1 - w) * cached``."""
    from ..layers import cached_output

    state, index, packing = module._l2c_state, module._l2c_index, module._l2c_packing
    if state.compute is not None and not state.compute[index]:
        cached = cached_output(state.cache, index)
        return cached if packing is None else packing.unpack(cached, args, kwargs)
    out = type(module).forward(module, *args, **kwargs)
    value = out if packing is None else packing.pack(out, args, kwargs)
    if state.weights is not None:
        if state.fresh is not None:
            state.fresh[index] = value
        weight = state.weights[index]
        value = weight * value + (1 - weight) * cached_output(state.cache, index)
    elif state.cache is not None:
        state.cache[index] = value
    return value if packing is None else packing.unpack(value, args, kwargs)


@functools.cache
def cached_transformer_class():
    """The wrapper's class, made on first use so that importing this module needs no torch."""
    import torch

    class _CachedTransformer(torch.nn.Module):
        """A diffusers transformer whose named sub-modules compute or reuse per call.

        ``forward_cached(*inputs, compute, cache)`` takes the family's graph inputs (the transformer's forward
        arguments, :meth:`DiffusersFamily.graph_inputs`), runs sub-layer ``i`` where ``compute[i]`` (its output
        written to ``cache[i]``) and otherwise returns ``cache[i]`` in its place; returns the transformer's output
        (N, C_out, H, W). Sub-modules keep their parameter names, under ``transformer.``.
        """

        def __init__(self, family: "DiffusersFamily", config: "DiffusersConfig", transformer: torch.nn.Module):
            super().__init__()
            self.config = config
            self.family_name = family.name
            self.transformer = transformer
            self._state = _CacheState()
            for index, path in enumerate(family.sublayer_names(config)):
                module = transformer.get_submodule(path)
                module._l2c_index = index
                module._l2c_state = self._state
                module._l2c_packing = family.output_packing(transformer, config, path)
                # An instance attribute, so deep copies (the exporter's stand-in) call their own copy.
                module.forward = functools.partial(_cached_forward, module)
            family.adapt_blocks(transformer, config)

        @property
        def family(self) -> "DiffusersFamily":
            from .. import get_family

            return get_family(self.family_name)

        def forward(self, *inputs):
            return self.forward_cached(*inputs, None, None)

        def forward_cached(self, *arguments):
            """``forward_cached(*inputs, compute, cache)``: compute (num_sublayers bools, None: all), cache (index ->
            (N, T, D), None: keep nothing), as every family's."""
            *inputs, compute, cache = arguments
            names = self.family.sublayer_names(self.config)
            if compute is not None and len(compute) != len(names):
                raise ValueError(f"compute has {len(compute)} entries; the model has {len(names)} sub-layers")
            self._state.compute, self._state.cache = compute, cache
            try:
                return self.family.run_transformer(self.transformer, self.config, *inputs)
            finally:
                self._state.compute = self._state.cache = None

        def forward_soft(self, *arguments):
            """``forward_soft(*inputs, weights, cache, fresh)``, L2C's student as every family's: every sub-layer is
            computed and contributes ``weights[i] * fresh_i + (1 - weights[i]) * cache[i]`` in place of its output;
            ``fresh`` (or None) receives each fresh output; ``cache`` is not modified. weights: (num_sublayers,)."""
            *inputs, weights, cache, fresh = arguments
            names = self.family.sublayer_names(self.config)
            if tuple(weights.shape) != (len(names),):
                raise ValueError(f"weights has shape {tuple(weights.shape)}; expected ({len(names)},)")
            self._state.weights, self._state.cache, self._state.fresh = weights, cache, fresh
            try:
                return self.family.run_transformer(self.transformer, self.config, *inputs)
            finally:
                self._state.weights = self._state.cache = self._state.fresh = None

    return _CachedTransformer




def expert_switch(experts, boundary_timestep: float):
    """A pipeline's experts (cached transformers, :func:`cached_transformer_class`; Wan2.2's ``transformer`` and
    ``transformer_2``) as one model, as the pipeline switches them: a call whose timestep is >= ``boundary_timestep``
    runs the first, a later one the second. It takes every forward of the cached model (``forward``,
    ``forward_cached``, ``forward_soft``) with one cache keyed by sub-layer index: that equals one cache per expert
    where the first call of each expert computes everything (a schedule must; it overwrites the whole cache), as the
    experts' sub-layers have the same shapes."""
    import torch

    class _ExpertSwitch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList(experts)
            self.config = experts[0].config  # the first's; the experts share the sub-layers and the interface
            self.family_name = experts[0].family_name
            self.boundary_timestep = float(boundary_timestep)

        @property
        def family(self):
            return self.experts[0].family

        def expert(self, timestep) -> torch.nn.Module:
            """The expert of a call at ``timestep`` (N,) (one value: a call's timesteps are the same)."""
            from ...core.manifest import expert_of_time

            return self.experts[expert_of_time(float(timestep.reshape(-1)[0]), self.boundary_timestep)]

        def forward(self, *inputs):
            return self.expert(inputs[1])(*inputs)

        def forward_cached(self, *arguments):
            return self.expert(arguments[1]).forward_cached(*arguments)

        def forward_soft(self, *arguments):
            return self.expert(arguments[1]).forward_soft(*arguments)

    return _ExpertSwitch()
