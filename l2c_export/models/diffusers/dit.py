"""``DiTTransformer2DModel`` as ``DiTPipeline`` samples it: class labels (null class 1000), guidance on every latent
channel, the learned-sigma half dropped before the scheduler step. Sub-layers: each block's ``attn1`` and ``ff``
(the block's adaLN-zero norm, gates and residual adds run every call)."""

from __future__ import annotations

from ...core.interface import LABEL
from .declaration import Blocks, Conditioning, Declaration, Guidance
from .family import DiffusersFamily

DIT_NULL_CLASS = 1000  # DiTPipeline's class_null

DECLARATION = Declaration(
    transformer_class="DiTTransformer2DModel",
    pipeline_classes=("DiTPipeline",),
    blocks=(Blocks(sublayers=("attn1", "ff")),),
    conditioning=(Conditioning(argument="class_labels", input="class_labels", kind=LABEL),),
    guidance=Guidance(default_scale=4.0, null_class=DIT_NULL_CLASS),  # DiTPipeline's guidance_scale
    default_steps=50,  # DiTPipeline's num_inference_steps
    required={"norm_type": "ada_norm_zero", "num_embeds_ada_norm": DIT_NULL_CLASS},
)

FAMILY = DiffusersFamily("diffusers-dit", DECLARATION)
