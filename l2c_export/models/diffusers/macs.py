"""MACs of a diffusers transformer, counted by hooks on the meta device (no memory, any size), each charged to the
sub-layer whose module holds it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...core.macs import MacCount

if TYPE_CHECKING:
    from .family import DiffusersConfig, DiffusersFamily


def count_macs_by_hooks(family: "DiffusersFamily", config: "DiffusersConfig") -> MacCount:
    """MACs of one sample's forward, counted on the meta device (no memory, any size): every Linear and Conv2d by its
    shapes, every attention's two products (2 * Tq * Tk * inner), each charged to the sub-layer whose module holds it,
    the rest to ``always``."""
    import torch

    names = family.sublayer_names(config)
    per_sublayer = [0] * len(names)
    always = 0

    def charge(path: str, macs: int) -> None:
        nonlocal always
        for index, name in enumerate(names):
            if path == name or path.startswith(name + "."):
                per_sublayer[index] += macs
                return
        always += macs

    def hook(path):
        def count(module, args, kwargs, out):
            if isinstance(module, torch.nn.Linear):  # by its input: a wrapped sub-layer may return a packed value
                rows = (args[0] if args else kwargs["input"]).numel() // module.in_features
                charge(path, rows * module.in_features * module.out_features)
            elif isinstance(module, torch.nn.Conv2d):
                kh, kw = module.kernel_size
                charge(path, out.numel() * module.in_channels // module.groups * kh * kw)
            else:  # an attention: queries from the first argument, keys from encoder_hidden_states when given
                query = args[0] if args else kwargs["hidden_states"]
                # by name or second (Wan's blocks call attn2(norm_hidden_states, encoder_hidden_states, ...))
                keys = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
                if keys is not None and getattr(module, "added_kv_proj_dim", None) is not None:
                    tokens = query.shape[1] + keys.shape[1]  # joint attention (SD3, FLUX.1): both streams attend
                    charge(path, 2 * tokens * tokens * module.inner_dim)
                else:
                    keys = query if keys is None else keys
                    charge(path, 2 * query.shape[1] * keys.shape[1] * module.inner_dim)
        return count

    def packed(path, packing):
        def count(module, args, kwargs, out):  # what a packing computes besides the module (a share of a linear map)
            charge(path, packing.macs(out))
        return count

    from ...core.extras import import_extra

    AttentionModuleMixin = import_extra("diffusers.models.attention").AttentionModuleMixin
    Attention = import_extra("diffusers.models.attention_processor").Attention

    with torch.device("meta"):
        model = family.create(config)
        inputs = family.macs_inputs(config)
        for path, module in model.transformer.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, Attention, AttentionModuleMixin)):
                module.register_forward_hook(hook(path), with_kwargs=True)
        for path in names:
            packing = model.transformer.get_submodule(path)._l2c_packing
            if packing is not None and hasattr(packing, "macs"):
                model.transformer.get_submodule(path).register_forward_hook(packed(path, packing), with_kwargs=True)
        with torch.no_grad():
            model(*inputs)
    return MacCount(always=always, per_sublayer=tuple(per_sublayer))

