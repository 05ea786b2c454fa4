"""``DiTTransformer2DModel`` as ``DiTPipeline`` samples it: class labels (null class 1000), guidance on every latent
channel, the learned-sigma half dropped before the scheduler step. Sub-layers: each block's ``attn1`` and ``ff``
(the block's adaLN-zero norm, gates and residual adds run every call)."""

from __future__ import annotations

from .. import TensorSpec
from . import DiffusersConfig, DiffusersFamily

DIT_NULL_CLASS = 1000  # DiTPipeline's class_null


class DiTDiffusersFamily(DiffusersFamily):
    name = "diffusers-dit"
    transformer_class = "DiTTransformer2DModel"
    pipeline_classes = ("DiTPipeline",)
    block_sublayers = ("attn1", "ff")
    required = {"norm_type": "ada_norm_zero", "num_embeds_ada_norm": DIT_NULL_CLASS}
    default_steps = 50  # DiTPipeline's num_inference_steps
    default_cfg_scale = 4.0  # DiTPipeline's guidance_scale

    def graph_inputs(self, config: DiffusersConfig) -> list[TensorSpec]:
        return [self.sample_spec(config), TensorSpec("timestep", "float32", (), "time"),
                TensorSpec("class_labels", "int64", (), "label")]

    def run_transformer(self, transformer, config: DiffusersConfig, hidden_states, timestep, class_labels):
        """hidden_states (N, C, H, W), timestep (N,), class_labels (N,) int64 -> (N, C_out, H, W)."""
        return transformer(hidden_states, timestep=timestep, class_labels=class_labels, return_dict=False)[0]

    def null_class(self, config: DiffusersConfig) -> int:
        return DIT_NULL_CLASS


FAMILY = DiTDiffusersFamily()
