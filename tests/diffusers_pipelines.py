"""Tiny random diffusers pipelines saved with ``save_pretrained``, and diffusers' own pipelines as the reference
(test-time only: the runtime never imports torch or diffusers).

:func:`save_tiny_pipeline` writes a ``DiTPipeline``, a ``PixArtAlphaPipeline(tokenizer=None, text_encoder=None)``
("pixart") or one with a tiny random ``T5EncoderModel`` and a T5-shaped tokenizer ("pixart-t5", :func:`tiny_t5`),
with a DDIM, DPM-Solver++ multistep or UniPC scheduler; :func:`schedule_hooks` makes a diffusers transformer follow a
schedule the way the paper defines it, with forward hooks on the named sub-modules that return their last computed
output at the calls the schedule skips.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch

SCHEDULERS = ("ddim", "dpm", "flow", "unipc")
DIT_CONFIG = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                  sample_size=8, patch_size=2)
PIXART_CONFIG = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                     cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12)
CAPTION_CHANNELS = PIXART_CONFIG["caption_channels"]
# SD3 (3 blocks: the last context_pre_only) and SD3.5 (dual attention in blocks 0 and 1, RMS qk_norm)
SD3_CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6,
                  out_channels=4, pos_embed_max_size=8)
SD35_CONFIG = dict(SD3_CONFIG, dual_attention_layers=(0, 1), qk_norm="rms_norm")
# FLUX.1-dev's layout in miniature: 2 double-stream blocks, 2 single-stream ones, rotary axes summing to the head dim
FLUX_CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6, guidance_embeds=True,
                   axes_dims_rope=(2, 2, 4))
# Sana's layout in miniature: ReLU linear self-attention, cross-attention, GLUMBConv; caption width as PixArt's
SANA_CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=2,
                   num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8,
                   caption_channels=CAPTION_CHANNELS, mlp_ratio=2.5, sample_size=8, patch_size=1)
# Sana 1.5's query/key RMS norms across heads
SANA15_CONFIG = dict(SANA_CONFIG, qk_norm="rms_norm_across_heads")
# Sana_1600M_1024px_diffusers' scheduler: DPM-Solver++ 2M on flow sigmas (shift 3), velocity prediction
SANA_SCHEDULER = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=2,
                      algorithm_type="dpmsolver++", final_sigmas_type="zero", lower_order_final=True)
# Qwen-Image's layout in miniature: 2 blocks, rotary axes summing to the head dim, the VAE's 4 channels packed 2x2
QWEN_CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(2, 2, 4))
# Wan2.1's layout in miniature: 3-D patches (1, 2, 2), 2 blocks of self-attention, cross-attention and feed-forward;
# the head dim even and 6 or more (the rotary embedding's frame, height and width parts)
WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                  text_dim=CAPTION_CHANNELS, freq_dim=8, ffn_dim=16, num_layers=2, cross_attn_norm=True,
                  rope_max_seq_len=32)
# Wan2.2-A14B's two experts in miniature: transformer_2 another random WAN_CONFIG (its feed-forward wider: a field the
# experts need not share) taking over below boundary_ratio x 1000 (Wan2.2 T2V's 0.875 is 1 step in 12 here: 0.9 is 4)
WAN22_CONFIG_2 = dict(WAN_CONFIG, ffn_dim=24)
WAN22_BOUNDARY = 0.9
FLOW_SCHEDULERS = {"sd3": dict(shift=3.0), "sd35": dict(shift=3.0),  # SD3-medium's and SD3.5's
                   "flux": dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                max_image_seq_len=4096, shift=3.0),  # FLUX.1-dev's
                   "qwen": dict(use_dynamic_shifting=True, time_shift_type="exponential", shift_terminal=0.02,
                                base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
                                shift=1.0),  # Qwen-Image's
                   "wan": dict(shift=3.0)}  # Wan2.1's flow_shift (480p), which WanPipeline runs with this scheduler


def _scheduler(kind: str, family: str = ""):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                           UniPCMultistepScheduler)

    if kind == "flow" and family.startswith("sana"):
        return DPMSolverMultistepScheduler(**SANA_SCHEDULER)
    if kind == "flow":
        return FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULERS[family])
    if kind == "ddim":
        return DDIMScheduler()
    if kind == "dpm":
        return DPMSolverMultistepScheduler()
    if kind == "unipc" and family == "wan":  # as Wan2.1's folders ship it (480p's flow shift)
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    if kind == "unipc":  # order 3: the predictor's and the corrector's solved weights run
        return UniPCMultistepScheduler(solver_order=3)
    raise ValueError(f"unknown scheduler {kind!r}; expected one of {SCHEDULERS}")


# The MMDiTs' VAEs scale and shift: SD3's and FLUX.1's factors
VAE_FACTORS = {"sd3": dict(scaling_factor=1.5305, shift_factor=0.0609),
               "flux": dict(scaling_factor=0.3611, shift_factor=0.1159)}


def tiny_vae(**factors):
    """One level (vae_scale_factor 1), 4 latent channels; ``factors``: scaling_factor, shift_factor."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), **factors)


SANA_VAE_SCALING = 0.41407  # DC-AE f32c32's scaling_factor


def tiny_dc_ae():
    """A tiny random ``AutoencoderDC`` (Sana's DC-AE) of two levels (vae_scale_factor 2: 8 x 8 latents decode to
    16 x 16 pixels), a ResBlock and an EfficientViT level (ReLU linear attention at scales 1 and 5), pixel-shuffle
    upsampling as DC-AE f32c32's, its scaling factor."""
    from diffusers import AutoencoderDC

    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                         encoder_block_types=("ResBlock", "EfficientViTBlock"),
                         decoder_block_types=("ResBlock", "EfficientViTBlock"),
                         encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                         encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                         encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                         upsample_block_type="pixel_shuffle", downsample_block_type="pixel_unshuffle",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=SANA_VAE_SCALING)


# The tiny tokenizer's words: prompts of other words tokenize letter by letter (the pieces below), as T5's do.
PROMPT_WORDS = ("a an the handwritten digit number zero one two three four five six seven eight nine of drawn "
                "picture").split()


def tiny_qwen_vae():
    """A tiny ``AutoencoderKLQwenImage``: 4 latent channels, one temporal level (vae_scale_factor 2)."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                  latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])


def tiny_wan_vae():
    """A tiny ``AutoencoderKLWan``: 4 latent channels, three levels with the last two downsampling in time (Wan 2.1's
    temporal factor 4; spatial factor 4), its config's scale factors said to match."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[True, True], latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0],
                            scale_factor_temporal=4, scale_factor_spatial=4)


def tiny_umt5():
    """A tiny random ``UMT5EncoderModel`` (d_model = the tiny Wan's text_dim; a relative position bias in every
    layer, not only the first as T5's) and :func:`tiny_t5`'s tokenizer (UMT5's is a T5 tokenizer of another
    vocabulary)."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer, _ = tiny_t5()
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=WAN_CONFIG["text_dim"], d_kv=4, d_ff=24,
                                          num_layers=2, num_heads=3, relative_attention_num_buckets=8,
                                          relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
                                          decoder_start_token_id=0))
    return tokenizer, encoder.eval()


def tiny_t5(word_level: bool = False):
    """A tiny random ``T5EncoderModel`` (d_model = the tiny PixArt's caption_channels) and a tokenizer of T5's shape
    built with the ``tokenizers`` library: a Unigram model over whole words (``▁word``), single letters and digits
    for anything else, T5's pad/eos/unk ids 0/1/2, its Metaspace pre-tokenizer and ``$A </s>`` post-processor,
    wrapped as transformers' T5 tokenizer so that ``save_pretrained`` writes tokenizer.json (transformers 5 rebuilds
    a T5 tokenizer as a Unigram model when it loads one, so a word-level model would not load back as one).
    ``word_level``: a WordLevel model over the words instead (unknown words <unk>), wrapped as transformers' generic
    fast tokenizer, which loads tokenizer.json as it is (how a small caption vocabulary is shipped)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0) for word in PROMPT_WORDS]
    vocab += [(piece, -5.0) for piece in "abcdefghijklmnopqrstuvwxyz0123456789"]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    metaspace = dict(replacement="\u2581", prepend_scheme="always", split=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Metaspace(**metaspace)])
    backend.decoder = decoders.Metaspace(**metaspace)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=backend, extra_ids=0)
    if word_level:
        backend = Tokenizer(models.WordLevel({token: i for i, (token, _) in enumerate(vocab[:3])}
                                             | {word: 3 + i for i, word in enumerate(PROMPT_WORDS)}, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                            unk_token="<unk>")
    encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=CAPTION_CHANNELS, d_kv=4, d_ff=24, num_layers=2,
                                      num_heads=3, relative_attention_num_buckets=8,
                                      relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
                                      decoder_start_token_id=0))
    return tokenizer, encoder.eval()


# The tiny CLIP tokenizers' words: byte-level BPE merges build each word from its letters, as CLIP's vocabulary does;
# anything else (digits, punctuation but "!", capitals are lower-cased) is a letter at a time or <|endoftext|> (unknown).
CLIP_WORDS = ("a the handwritten digit seven three picture of blurry drawn").split()
CLIP_MAX_LENGTH = 77  # CLIP's model_max_length: the pipelines' tokenizer_max_length


def tiny_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A tiny CLIP tokenizer (transformers' ``CLIPTokenizer``, backed by a ``tokenizers`` BPE with CLIP's
    normalizer, pre-tokenizer, ``</w>`` word ends and post-processor), ``model_max_length`` 77: letters, digits,
    "!", merges for :data:`CLIP_WORDS`, <|startoftext|> and <|endoftext|> the highest ids (as in CLIP, where the
    legacy pooled position is the argmax of the ids). ``pad_token``: CLIP-L pads with <|endoftext|>, SD3's CLIP-G
    with "!"."""
    from transformers import CLIPTokenizer

    symbols = list("abcdefghijklmnopqrstuvwxyz0123456789!")
    vocab = {}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges = []
    for word in CLIP_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


def tiny_clip(hidden_size: int, projection_dim: int | None, pad_token: str = "<|endoftext|>",
              legacy_eos: bool = False):
    """(tokenizer, encoder): :func:`tiny_clip_tokenizer` and a tiny random ``CLIPTextModelWithProjection``
    (``projection_dim`` given: SD3's pair) or ``CLIPTextModel`` (FLUX.1's), 77 positions. ``legacy_eos``: the
    config's eos_token_id is 2, as CLIP's released configs have it (the pooled position is then the argmax of the
    ids), else the tokenizer's <|endoftext|> id (the first of it)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer(pad_token)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
                            projection_dim=projection_dim or hidden_size, pad_token_id=1,
                            bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=2 if legacy_eos else tokenizer.eos_token_id)
    encoder = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return tokenizer, encoder.eval()


def sd3_text_encoders() -> dict:
    """SD3's three pairs in miniature: CLIP-L (4 wide, pooled projected to 2, its config's legacy eos_token_id 2),
    CLIP-G (6 wide, pooled 4, padding with "!") and T5 (12 wide): the CLIPs' 4 + 6 channels are padded to T5's 12
    (joint_attention_dim), the pooled 2 + 4 make pooled_projection_dim 6."""
    tokenizer, text_encoder = tiny_clip(4, 2, legacy_eos=True)
    tokenizer_2, text_encoder_2 = tiny_clip(6, 4, pad_token="!")
    tokenizer_3, text_encoder_3 = tiny_t5()
    return dict(text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def flux_text_encoders() -> dict:
    """FLUX.1's two pairs in miniature: CLIP-L as a ``CLIPTextModel`` 6 wide (its pooler_output is
    pooled_projection_dim 6) and T5 12 wide (joint_attention_dim)."""
    tokenizer, text_encoder = tiny_clip(6, None)
    tokenizer_2, text_encoder_2 = tiny_t5()
    return dict(text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer_2)


# The tiny LLM tokenizers' words: the words of the text their pipeline puts the prompt in (Sana's
# complex_human_instruction, Qwen-Image's chat template) and of the tests' prompts, each merged from its letters by BPE
# (a word after a space as one more merge); anything else a letter (or a byte) at a time.
LLM_PROMPT_WORDS = (*CLIP_WORDS, "number", "eight", "nine")


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"[A-Za-z]+", text)


def _word_merges(words, space: str, vocab: dict) -> list[tuple[str, str]]:
    """BPE merges that build each of ``words`` from its letters, longest words first, then ``space`` + the word;
    each merged piece added to ``vocab``."""
    words = sorted(dict.fromkeys(words), key=lambda word: (-len(word), word))
    merges = []
    for word in words:
        pieces = list(word)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    for word in words:
        merges.append((space, word))
        vocab.setdefault(space + word, len(vocab))
    return list(dict.fromkeys(merges))


def sana_instruction() -> str:
    """``SanaPipeline``'s default ``complex_human_instruction``, its lines joined as the pipeline joins them."""
    import inspect

    from diffusers import SanaPipeline

    return "\n".join(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


def tiny_gemma2(hidden_size: int = CAPTION_CHANNELS):
    """(tokenizer, encoder): transformers' ``GemmaTokenizer`` (Gemma's BPE with byte fallback, spaces as "▁", <bos>
    added) over letters, digits, byte tokens and merges for Sana's instruction and the prompts' words, and a tiny
    random ``Gemma2Model`` ``hidden_size`` wide (the tiny Sana's caption_channels), its sliding window 16 tokens (so
    that the instruction's length crosses it)."""
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{byte:02X}>": 5 + byte for byte in range(256)})
    for symbol in "\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.:'-!>":
        vocab.setdefault(symbol, len(vocab))
    merges = _word_merges(_words(sana_instruction()) + list(LLM_PROMPT_WORDS), "\u2581", vocab)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=6,
                          sliding_window=16, max_position_embeddings=1024, query_pre_attn_scalar=6, pad_token_id=0,
                          eos_token_id=1, bos_token_id=2)
    return tokenizer, Gemma2Model(config).eval()


def tiny_qwen2_5_vl(hidden_size: int = 12):
    """(tokenizer, encoder): transformers' ``Qwen2Tokenizer`` (byte-level BPE) over the 256 byte symbols and merges
    for Qwen-Image's chat template and the prompts' words, <|im_start|> and <|im_end|> special, and a tiny random
    ``Qwen2_5_VLForConditionalGeneration`` (text ``hidden_size`` wide: the tiny Qwen-Image's joint_attention_dim;
    multimodal rotary sections 1 + 1 + 1 of its head's 3 frequencies; a one-block vision tower the prompts never
    reach), its text config nested as transformers 5 saves it."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    from l2c_export.models.diffusers.qwenimage import PROMPT_TEMPLATE

    vocab = {"<|endoftext|>": 0}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    merges = _word_merges(_words(PROMPT_TEMPLATE) + list(LLM_PROMPT_WORDS), "\u0120", vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                bos_token_id=0, eos_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 1]})
    vision = dict(depth=1, hidden_size=8, intermediate_size=8, num_heads=2, out_hidden_size=hidden_size,
                  patch_size=2, temporal_patch_size=1, spatial_merge_size=1, window_size=4, fullatt_block_indexes=[0])
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    return tokenizer, encoder.eval()


def tiny_pipeline(family: str, scheduler: str = "ddim", seed: int = 0):
    """A tiny random ``DiTPipeline`` (``family`` "dit"), ``PixArtAlphaPipeline`` ("pixart": without text encoder;
    "pixart-t5": with :func:`tiny_t5`; "pixart-t5-words": with its word-level tokenizer), ``StableDiffusion3Pipeline``
    ("sd3", "sd35"; "sd3-text" with :func:`sd3_text_encoders`) or ``FluxPipeline`` ("flux"; "flux-text" with
    :func:`flux_text_encoders`; these with scheduler "flow", without text encoders unless "-text"; their VAEs with
    SD3's and FLUX.1's scaling and shift factors), fp32, eval. The VAE has one level, so pixels are latents
    (vae_scale_factor 1). ``SanaPipeline`` ("sana"; "sana15" with Sana 1.5's qk norms): scheduler "flow" is Sana's
    DPM-Solver++ on flow sigmas, the VAE :func:`tiny_dc_ae` (vae_scale_factor 2), no text encoder ("sana-text":
    :func:`tiny_gemma2`); ``QwenImagePipeline`` ("qwen"), no text encoder ("qwen-text": :func:`tiny_qwen2_5_vl`);
    ``WanPipeline`` ("wan", scheduler "flow": flow-matching Euler with Wan's shift 3), no text encoder ("wan-text":
    :func:`tiny_umt5`), :func:`tiny_wan_vae` (scale factors 4 in time and in space); "wan22": Wan2.2's two experts,
    ``transformer_2`` (:data:`WAN22_CONFIG_2`) below ``boundary_ratio`` :data:`WAN22_BOUNDARY`, no VAE (the pipeline's
    scale factors 4 in time and 8 in space)."""
    from diffusers import (DiTPipeline, DiTTransformer2DModel, FluxPipeline, FluxTransformer2DModel,
                           PixArtAlphaPipeline, PixArtTransformer2DModel, SanaPipeline, SanaTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)

    torch.manual_seed(seed)
    if family in ("sana", "sana15", "sana-text"):
        tokenizer, text_encoder = tiny_gemma2() if family == "sana-text" else (None, None)
        config = SANA15_CONFIG if family == "sana15" else SANA_CONFIG
        pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_dc_ae(),
                            transformer=SanaTransformer2DModel(**config), scheduler=_scheduler("flow", family))
    elif family in ("sd3", "sd35", "sd3-text"):
        encoders = {f"{kind}{suffix}": None for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
        if family == "sd3-text":
            encoders = sd3_text_encoders()
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**(SD35_CONFIG if family == "sd35" else SD3_CONFIG)),
            vae=tiny_vae(**VAE_FACTORS["sd3"]),
            scheduler=_scheduler("flow", family.removesuffix("-text")), **encoders)
    elif family in ("flux", "flux-text"):
        encoders = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        if family == "flux-text":
            encoders = flux_text_encoders()
        pipe = FluxPipeline(transformer=FluxTransformer2DModel(**FLUX_CONFIG), vae=tiny_vae(**VAE_FACTORS["flux"]),
                            scheduler=_scheduler("flow", "flux"), **encoders)
    elif family in ("qwen", "qwen-text"):
        from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

        tokenizer, text_encoder = tiny_qwen2_5_vl(QWEN_CONFIG["joint_attention_dim"]) if family == "qwen-text" \
            else (None, None)
        pipe = QwenImagePipeline(transformer=QwenImageTransformer2DModel(**QWEN_CONFIG), vae=tiny_qwen_vae(),
                                 scheduler=_scheduler("flow", "qwen"), text_encoder=text_encoder,
                                 tokenizer=tokenizer)
    elif family in ("wan", "wan-text", "wan22"):
        from diffusers import WanPipeline, WanTransformer3DModel

        tokenizer, text_encoder = tiny_umt5() if family == "wan-text" else (None, None)
        two = family == "wan22"  # no VAE: the experts' latents are what is compared (the scale factors 4 and 8)
        experts = dict(transformer_2=WanTransformer3DModel(**WAN22_CONFIG_2), boundary_ratio=WAN22_BOUNDARY) if two \
            else {}
        pipe = WanPipeline(transformer=WanTransformer3DModel(**WAN_CONFIG), vae=None if two else tiny_wan_vae(),
                           scheduler=_scheduler(scheduler, "wan"), text_encoder=text_encoder, tokenizer=tokenizer,
                           **experts)
    elif family == "dit":
        pipe = DiTPipeline(transformer=DiTTransformer2DModel(**DIT_CONFIG), vae=tiny_vae(),
                           scheduler=_scheduler(scheduler))
    elif family in ("pixart", "pixart-t5", "pixart-t5-words"):
        tokenizer, text_encoder = tiny_t5(family == "pixart-t5-words") if family != "pixart" else (None, None)
        pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(),
                                   transformer=PixArtTransformer2DModel(**PIXART_CONFIG),
                                   scheduler=_scheduler(scheduler))
    else:
        raise ValueError(f"unknown family {family!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(folder: Path, family: str, scheduler: str = "ddim", seed: int = 0) -> Path:
    tiny_pipeline(family, scheduler, seed).save_pretrained(str(folder))
    return folder


def load_pipeline(folder: Path):
    """The saved pipeline, as diffusers loads it (the components saved as null, text encoders and tokenizers, as
    None)."""
    import json

    from diffusers import DiffusionPipeline

    index = json.loads((Path(folder) / "model_index.json").read_text())
    absent = {name: None for name, entry in index.items() if isinstance(entry, list) and entry[0] is None}
    pipe = DiffusionPipeline.from_pretrained(str(folder), **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def schedule_hooks(transformer: torch.nn.Module, sublayers: Sequence[str], compute, passes: int = 1):
    """While active, call ``k`` of ``transformer`` computes sub-module ``sublayers[j]`` where ``compute[k][j]``; where
    not, the module's output is replaced by its most recent computed output (forward hooks, diffusers untouched).
    ``passes``: the pipeline calls the transformer that many times a step (cond and uncond apart): call ``k`` is
    step ``k // passes`` and each pass keeps its own outputs. Yields the list of calls made so far."""
    calls: list[int] = [0]
    last: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def hook(name, column):
        def replace(module, args, output):
            step, key = calls[0] // passes, (calls[0] % passes, name)
            if compute[step][column]:
                last[key] = output
                return output
            return last[key]
        return replace

    def count(module, args, output):
        calls[0] += 1

    for column, name in enumerate(sublayers):
        handles.append(transformer.get_submodule(name).register_forward_hook(hook(name, column)))
    handles.append(transformer.register_forward_hook(count))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def build_two_experts(folder: Path, out: Path, steps: int, image_size, num_frames: int) -> Path:
    """Builds a two-expert Wan2.2 folder (:func:`tiny_pipeline`'s "wan22") at ``steps`` into ``out`` over a general
    schedule of its named sub-layers that reuses some in both experts (every other sub-layer at odd calls, the first
    at every third), the first call of each expert computing everything (its cache is empty); returns ``out``."""
    import numpy as np

    from l2c_export.builder.build import BuildRequest, build
    from l2c_export.core.schedule import Schedule
    from l2c_export.models.zoo import from_diffusers

    spec = from_diffusers(folder, image_size, num_frames=num_frames)
    sampler = spec.sampler(None, steps)
    step_expert = spec.experts.step_expert(sampler)
    rows = np.ones((steps, len(spec.sublayer_names)), dtype=bool)
    rows[1::2, 1::2] = False
    rows[2::3, 0] = False
    rows[[step_expert.index(0), step_expert.index(1)]] = True
    build(BuildRequest(spec=spec, schedule=Schedule(rows, sublayers=spec.sublayer_names, mode="general"),
                       sampler=sampler, out_dir=out), progress=False)
    return out
