"""``QwenImageTransformer2DModel`` (Qwen-Image) as ``QwenImagePipeline`` samples it: an MMDiT whose every block runs
joint attention over an image and a text stream, then an MLP per stream.

Sub-layers, per block in forward order: ``attn`` (the joint attention; it returns (image (N, T, D), text (N, L, D)),
cached as one (N, T + L, D), image first, split back where reused: the MMDiTs' :class:`.mmdit.JointAttentionPacking`),
``img_mlp`` (N, T, D) and ``txt_mlp`` (N, L, D). Both streams' adaLN modulation, gates and residual adds run every
call.

Latents are packed as the pipeline packs them, (N, T, 4 C), T = (H / 2) (W / 2) for latents H x W = pixels over the
VAE's scale factor (``build --image-size``; default the pipeline's 1024 px): FLUX.1's sizing, which this family shares
(:class:`.flux.FluxDiffusersFamily`). The model predicts the flow-matching velocity (N, T, 4 C) (``proj_out``: the
2x2 patch of ``out_channels``).

Conditioning: ``prompt_embeds`` (N, L, joint_attention_dim) and ``prompt_embeds_mask`` (N, L), 1 keep / 0 padding
(graph inputs ``encoder_hidden_states``, ``encoder_hidden_states_mask``), declared with their ``negative_``
partners. The pipeline calls the transformer twice per
step, the prompt then the negative prompt, each at its own length; the runtime runs both as one 2N batch, the shorter
padded with zero embeddings under mask 0 (:func:`l2c_export.samplers.conditioning.pad_halves`: the rule of
every model whose token mask has a negative partner). That equals the
two calls to float rounding: text token i sits at rotary position ``max_vid_index + i`` whatever the length, a
masked token is never attended to, and everything else is per token. ``--cfg-scale`` is the pipeline's
``true_cfg_scale``: ``u + s (c - u)`` rescaled per token to the norm of ``c`` (the ``true_cfg`` guidance rule).

The rotary embedding: the pipeline's positions (``img_shapes`` = [(1, h, w)] at the build's size, ``pos_embed``'s
tables), applied in real arithmetic (:class:`RealRotaryJointAttention`; diffusers multiplies complex numbers, which
ONNX has no type for); the image's cos/sin are constants of the graph, the text's gathered from a constant table by
position, so the prompt axis stays dynamic. The timestep fed is the scheduler's (0..1000); the graph divides it by
1000, as the pipeline does.

The VAE kind is ``AutoencoderKLQwenImage`` (:meth:`QwenImageDiffusersFamily.vae_decoder`): one frame decoded, the
per-channel ``latents_mean``/``latents_std`` applied inside the decoder graph. Prompts: the Qwen2.5-VL text encoder
(``Qwen2_5_VLForConditionalGeneration``, text only) is a graph of its language model's last hidden state, run as
``encode_prompt`` runs it (the stack's declaration below); a folder without it builds taking prompt embeddings.
"""

from __future__ import annotations

import contextlib

from ...core.interface import PACKED_2X2, TOKEN_EMBEDDINGS, TOKEN_MASK, TRUE_CFG
from ...core.util import short_repr
from .declaration import (JOINT, PROMPT, Blocks, Conditioning, Declaration, EncodePrompt, FlowTimesteps, Guidance,
                          VaeKind)
from .family import DiffusersConfig, DiffusersFamily
from .files import DiffusersFolderError
from .flux import FluxDiffusersFamily
from .sizes import QWEN_IMAGE_SIZES, QWEN_ROPE_AXES, TRANSFORMER_SIZES, check_integer_list
from .text_encoders import TextEncoder, TextEncoderStack

MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline's max_sequence_length default: the longest prompt_embeds it keeps
TEXT_POSITIONS = 1024  # the pipeline's bound on max_sequence_length: the text rotary table's rows
# QwenImagePipeline's prompt_template_encode (its prompt_template_encode_start_idx 34 leading tokens dropped)
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")


def _rotate(x, cos, sin):
    """diffusers' ``apply_rotary_emb_qwen(x, freqs, use_real=False)`` in real arithmetic: x (N, S, H, D), its
    interleaved pairs the complex numbers; cos, sin (S, D / 2) the real and imaginary parts of ``freqs``."""
    import torch

    pairs = x.float().unflatten(-1, (-1, 2))  # unflatten, not reshape: the tracer keeps N and S dynamic
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]  # (S, 1, D / 2), against the heads
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(3).type_as(x)


class RealRotaryJointAttention:
    """``QwenDoubleStreamAttnProcessor2_0`` with :func:`_rotate` for its complex rotary product and the streams
    split at the image's token count from the end (the text's length varies per request): hidden_states (N, T, D),
    encoder_hidden_states (N, L, D), encoder_hidden_states_mask (N, L) bool, image_rotary_emb ((cos, sin) of the
    image (T, D / 2), of the text (L, D / 2)) -> (image (N, T, D), text (N, L, D))."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        import torch
        import torch.nn.functional as F

        image_tokens = hidden_states.shape[1]  # fixed by the build's image size
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones_like(hidden_states[..., 0], dtype=torch.bool)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        head_dim = attn.inner_dim // attn.heads
        streams = []
        for stream, (q, k, v), (norm_q, norm_k) in (
                (hidden_states, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)),
                (encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                 (attn.norm_added_q, attn.norm_added_k))):
            query, key, value = (proj(stream).unflatten(-1, (-1, head_dim)) for proj in (q, k, v))
            query = norm_q(query) if norm_q is not None else query
            key = norm_k(key) if norm_k is not None else key
            streams.append([query, key, value])
        if image_rotary_emb is not None:
            for (query_key, (cos, sin)) in zip(streams, image_rotary_emb):
                query_key[0], query_key[1] = _rotate(query_key[0], cos, sin), _rotate(query_key[1], cos, sin)
        image, text = streams
        # text first, as diffusers joins them; (N, S, H, D) -> SDPA's (N, H, S, D) and back, as its native backend
        query, key, value = (torch.cat([t, i], dim=1).transpose(1, 2) for t, i in zip(text, image))
        joint = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                               is_causal=False)
        joint = joint.transpose(1, 2).flatten(2, 3).to(query.dtype)
        text_out, image_out = joint[:, :-image_tokens], joint[:, -image_tokens:]
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)  # dropout
        return image_out, attn.to_add_out(text_out.contiguous())


DECLARATION = Declaration(
    transformer_class="QwenImageTransformer2DModel",
    pipeline_classes=("QwenImagePipeline",),
    # joint attention caches both streams (image first), img_mlp the image's tokens, txt_mlp the prompt's
    blocks=(Blocks(sublayers=("attn", "img_mlp", "txt_mlp"), cached={"attn": JOINT, "txt_mlp": PROMPT}),),
    # the prompt and the negative prompt may differ in length: the mask covers the tokens, so the shorter is padded
    conditioning=(
        Conditioning(argument="prompt_embeds", input="encoder_hidden_states", kind=TOKEN_EMBEDDINGS,
                     width="joint_attention_dim", negative="negative_prompt_embeds"),
        Conditioning(argument="prompt_embeds_mask", input="encoder_hidden_states_mask", kind=TOKEN_MASK,
                     negative="negative_prompt_embeds_mask", pads_negative=True),
    ),
    # true_cfg_scale: u + s (c - u), rescaled per token to the norm of c
    guidance=Guidance(default_scale=4.0, rule=TRUE_CFG, scale_argument="true_cfg_scale"),
    scheduler_classes=("FlowMatchEulerDiscreteScheduler",),
    flow_timesteps=FlowTimesteps(linspace_sigmas=True, default_max_shift=1.15),
    latent_layout=PACKED_2X2,  # QwenImagePipeline._pack_latents; unpacked before the VAE
    # _get_qwen_prompt_embeds: Qwen2.5-VL's hidden_states[-1] of the chat template around the prompt (the negative
    # prompt too), each prompt's own tokens after the template's first 34, re-padded to the longest, at most
    # max_sequence_length
    text_encoders=TextEncoderStack(
        encoders=(TextEncoder("text_encoder", "tokenizer", "qwen2_5_vl", ("last_hidden_state",), masked=True,
                              template=PROMPT_TEMPLATE, selection="mask_rows", selection_count=34),),
        arrays=(("prompt_embeds", (("text_encoder/last_hidden_state",),)),
                ("prompt_embeds_mask", (("text_encoder/attention_mask",),))),
        negative_prompt_required=True),  # the pipeline runs true CFG only with a negative prompt
    vae=VaeKind(classes=("AutoencoderKLQwenImage",), kind="mean_std"),
    default_steps=50,  # the pipeline's num_inference_steps
    max_sequence_length={"QwenImagePipeline": MAX_SEQUENCE_LENGTH},
    macs_prompt_tokens=MAX_SEQUENCE_LENGTH,
    # the pipeline packs 2x2 latent patches; the base Qwen-Image (no Edit's zero_cond_t, no Layered's extras)
    required={"patch_size": 2, "guidance_embeds": False, "zero_cond_t": False, "use_additional_t_cond": False,
              "use_layer3d_rope": False},
    # called once for the prompts and once for the negative prompts, as the pipeline does under true CFG
    encode_prompt=EncodePrompt(("prompt_embeds", "prompt_embeds_mask"), guided=False),
)


class QwenImageDiffusersFamily(FluxDiffusersFamily):
    """The declaration, with what Qwen-Image's rotary embedding and VAE need in code; FLUX.1's packed-latent sizing."""

    def check_config(self, config: DiffusersConfig, where: str) -> None:
        DiffusersFamily.check_config(self, config, where)
        check_integer_list(config, "axes_dims_rope", QWEN_ROPE_AXES, where, DiffusersFolderError, (3, 3))
        axes = config.get("axes_dims_rope") or (16, 56, 56)
        if any(axis % 2 for axis in axes) or sum(axes) != config["attention_head_dim"]:
            raise DiffusersFolderError(f"{where}: field 'axes_dims_rope' is {short_repr(config.get('axes_dims_rope'))}"
                                       f"; expected three even sizes summing to attention_head_dim "
                                       f"{config['attention_head_dim']}")
        if config["in_channels"] % 4:
            raise DiffusersFolderError(f"{where}: field 'in_channels' is {config['in_channels']}; expected 4 x the "
                                       f"VAE's latent channels (the pipeline packs 2x2 patches)")

    def out_channels(self, config: DiffusersConfig) -> int:
        """``proj_out``'s width: a 2x2 patch of ``out_channels`` (16 for Qwen-Image: 64, the packed sample's)."""
        return config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"])

    # -- sub-layers --------------------------------------------------------------------------------------------------
    def adapt_blocks(self, transformer, config: DiffusersConfig) -> None:
        """Each joint attention runs :class:`RealRotaryJointAttention`; the rotary tables are made once, here, so
        that the exporter's trace sees constants (diffusers makes them with complex arithmetic)."""
        for block in transformer.transformer_blocks:
            block.attn.set_processor(RealRotaryJointAttention())
        transformer._l2c_rotary_tables = self.rotary_tables(transformer, config)

    @contextlib.contextmanager
    def export_context(self):
        yield

    def rotary_tables(self, transformer, config: DiffusersConfig):
        """((cos, sin) of the image tokens (T, D / 2), (cos, sin) of text positions 0..TEXT_POSITIONS - 1): what
        ``pos_embed`` returns for the pipeline's ``img_shapes`` [(1, h, w)] (h = w = the packed side), as real
        tables."""
        import torch

        side = self.latent_size(config) // 2
        pos_embed = transformer.pos_embed
        with torch.no_grad():
            image, text = pos_embed([(1, side, side)], max_txt_seq_len=TEXT_POSITIONS,
                                    device=pos_embed.pos_freqs.device)
            return tuple((table.real.contiguous(), table.imag.contiguous()) for table in (image, text))

    def run_transformer(self, transformer, config: DiffusersConfig, hidden_states, timestep, encoder_hidden_states,
                        encoder_hidden_states_mask):
        """``QwenImageTransformer2DModel.forward`` as the pipeline calls it: hidden_states (N, T, C) packed,
        timestep (N,) the scheduler's (0..1000), encoder_hidden_states (N, L, joint_attention_dim),
        encoder_hidden_states_mask (N, L) 1 keep / 0 padding -> the velocity (N, T, C_out). The blocks are
        diffusers'; the rotary tables (:meth:`rotary_tables`) are gathered here."""
        import torch

        device = hidden_states.device
        (image_cos, image_sin), (text_cos, text_sin) = transformer._l2c_rotary_tables
        # text positions 0..L-1 from the prompt's own axis (a size read as an int would be traced as a constant)
        positions = (torch.cumsum(torch.ones_like(encoder_hidden_states_mask[0]), 0) - 1).long()
        rotary = ((image_cos.to(device), image_sin.to(device)),
                  (text_cos.to(device).index_select(0, positions), text_sin.to(device).index_select(0, positions)))
        hidden = transformer.img_in(hidden_states)
        temb = transformer.time_text_embed((timestep / 1000).to(hidden.dtype), hidden)
        text = transformer.txt_in(transformer.txt_norm(encoder_hidden_states))
        mask = encoder_hidden_states_mask.to(torch.bool)
        for block in transformer.transformer_blocks:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                                 temb=temb, image_rotary_emb=rotary)
        return transformer.proj_out(transformer.norm_out(hidden, temb))


FAMILY = QwenImageDiffusersFamily(
    "diffusers-qwenimage", DECLARATION,
    sizes={**{k: v for k, v in TRANSFORMER_SIZES.items() if k != "sample_size"}, **QWEN_IMAGE_SIZES})
