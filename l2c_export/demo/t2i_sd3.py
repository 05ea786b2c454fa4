"""The embedded text-to-image model ``t2i-digits-sd3``: a small Stable Diffusion 3 (an MMDiT with flow matching)
trained here on scikit-learn's digits, shipped as the diffusers folder ``l2c_export/demo/t2i-digits-sd3/`` (what
``StableDiffusion3Pipeline.save_pretrained`` writes), sampled by diffusers' own ``StableDiffusion3Pipeline``.

- **Captions.** Those of ``t2i-digits`` (:mod:`l2c_export.demo.t2i`): seven forms trained on, three held out.
- **Text encoders.** SD3's three: CLIP-L and CLIP-G (``CLIPTextModelWithProjection``, their penultimate hidden states
  side by side, their projected pooled outputs side by side) and T5 (``T5EncoderModel``), all small, random and frozen
  (as SD3 freezes its encoders: the transformer learns to read them). The CLIPs are context-free: their position
  embeddings and attention outputs are zero, so a word's hidden states are its own wherever it stands and every
  prompt's pooled embedding is the same (a random causal CLIP gives the digit's word a new state in each new caption
  form, which the transformer misread: 50% on the held-out forms). The CLIPs read :data:`CLIP_TOKENS` tokens (their
  tokenizers' ``model_max_length``: the pipeline's ``tokenizer_max_length``), byte-level BPE tokenizers whose merges
  spell the captions' words; T5 reads the pipeline's ``max_sequence_length`` (256) with ``t2i-digits``' word-level
  tokenizer. T5's relative position bias is zero: its 256 - n padding tokens are then identical, and stay identical
  through the MMDiT's text stream (which has no positions), which is what makes training cheap (below). A held-out
  caption form is then, in the CLIPs' tokens, the trained words' own states in a new combination.
- **VAE.** ``t2i-digits``' ``AutoencoderKL`` (8x8x1 digits -> 4x4x4 latents), with ``shift_factor`` 0 (SD3's pipeline
  decodes ``latents / scaling_factor + shift_factor``).
- **Transformer.** ``SD3Transformer2DModel`` on the 4x4x4 latents (patch 1), trained with SD3's rectified-flow
  objective (velocity ``noise - x0`` at ``x_s = (1 - s) x0 + s noise``, s logit-normal, timestep ``1000 s``), captions
  dropped to the empty prompt's embeddings with probability 0.1 (the pipeline's negative prompt is ""), EMA weights.
  The identical padding tokens are trained as one key per slot with the log of the tokens it stands for added to its
  attention logits (:class:`CollapsedJointAttention`): exactly the attention over all 16 + 256 prompt tokens.
- **Scheduler.** ``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3.0; the pipeline's 28 steps and guidance 7.0.

``l2c-export train-default --model t2i-digits-sd3`` reproduces the folder (:func:`train_sd3`); ``python -m
l2c_export.demo.t2i_sd3 accuracy`` measures what diffusers' own pipeline draws with the digits classifier.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.extras import import_extra
from . import t2i
from .train import digits_dataset, fit

SD3_NEEDS = "the t2i-digits-sd3 demo (a StableDiffusion3Pipeline)"
SD3_DIR = Path(__file__).parent / "t2i-digits-sd3"
CLIP_TOKENS = 16  # the CLIP tokenizers' model_max_length: the pipeline's tokenizer_max_length
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
SAMPLE_STEPS = 28  # the pipeline's num_inference_steps
GUIDANCE = 7.0  # the pipeline's guidance_scale


@dataclass(frozen=True)
class SD3Config:
    """The sizes of the model and how it is trained (the shipped folder's are the defaults)."""

    num_layers: int = 4
    num_attention_heads: int = 2
    attention_head_dim: int = 32
    clip_l_width: int = 32
    clip_g_width: int = 32
    clip_projection: int = 32  # each CLIP's pooled projection: pooled_projection_dim is twice this
    t5_width: int = 64  # joint_attention_dim (the CLIPs' 32 + 32 are padded to it)
    steps: int = 5000
    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.999
    caption_drop: float = 0.1
    pooled_swap: float = 0.5  # the pooled embedding is another caption's (any digit) with this probability (context-
    # free CLIPs give every caption the same pooled embedding: then this only draws random numbers)
    clip_context_free: bool = True  # the CLIPs' position embeddings and attention outputs zero: each token its own
    shift: float = 3.0


# -- the parts -------------------------------------------------------------------------------------------------------
def make_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIP tokenizer (transformers' ``CLIPTokenizer``: byte-level BPE with CLIP's ``</w>`` word ends) over letters
    and digits, with merges spelling every caption word; ``model_max_length`` :data:`CLIP_TOKENS`. CLIP-L pads with
    <|endoftext|>, SD3's CLIP-G with "!"."""
    CLIPTokenizer = import_extra("transformers", SD3_NEEDS).CLIPTokenizer
    vocab = {}
    for symbol in "abcdefghijklmnopqrstuvwxyz0123456789!":
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges = []
    for word in t2i.caption_vocabulary():
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), pad_token=pad_token,
                         model_max_length=CLIP_TOKENS)


def make_clip(tokenizer, width: int, projection: int, context_free: bool = False):
    """A small random ``CLIPTextModelWithProjection`` (2 layers, :data:`CLIP_TOKENS` positions), frozen; its pooled
    position is the first <|endoftext|>. ``context_free``: its position embeddings and attention outputs zero, so each
    token's hidden states are those of its own word wherever it stands."""
    transformers = import_extra("transformers", SD3_NEEDS)
    config = transformers.CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         max_position_embeddings=CLIP_TOKENS, projection_dim=projection,
                                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id)
    clip = transformers.CLIPTextModelWithProjection(config).eval().requires_grad_(False)
    if context_free:
        with torch.no_grad():
            clip.text_model.embeddings.position_embedding.weight.zero_()
            for layer in clip.text_model.encoder.layers:
                layer.self_attn.out_proj.weight.zero_()
                layer.self_attn.out_proj.bias.zero_()
    return clip


def make_t5(config: SD3Config, vocab_size: int):
    """``t2i-digits``' small T5 at ``t5_width``, its relative position bias zero (its padding tokens identical)."""
    encoder = t2i.make_text_encoder(t2i.T2IConfig(text_width=config.t5_width), vocab_size)
    with torch.no_grad():
        encoder.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.zero_()
    return encoder


def make_transformer(config: SD3Config):
    SD3Transformer2DModel = import_extra("diffusers", SD3_NEEDS).SD3Transformer2DModel
    inner = config.num_attention_heads * config.attention_head_dim
    return SD3Transformer2DModel(sample_size=4, patch_size=1, in_channels=4, out_channels=4,
                                 num_layers=config.num_layers, attention_head_dim=config.attention_head_dim,
                                 num_attention_heads=config.num_attention_heads, joint_attention_dim=config.t5_width,
                                 caption_projection_dim=inner, pooled_projection_dim=2 * config.clip_projection,
                                 pos_embed_max_size=4)


def make_scheduler(config: SD3Config):
    return import_extra("diffusers", SD3_NEEDS).FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
                                                                                 shift=config.shift)


def shipped_vae():
    """``t2i-digits``' VAE with ``shift_factor`` 0 (the latents SD3's pipeline decodes are those t2i-digits' are)."""
    AutoencoderKL = import_extra("diffusers", SD3_NEEDS).AutoencoderKL
    vae = AutoencoderKL.from_pretrained(str(t2i.T2I_DIR / "vae")).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)
    return vae


def make_pipeline(config: SD3Config, transformer=None, vae=None, seed: int = 0):
    """A ``StableDiffusion3Pipeline`` of the parts (the transformer untrained where not given); the text encoders are
    seeded by ``seed``."""
    StableDiffusion3Pipeline = import_extra("diffusers", SD3_NEEDS).StableDiffusion3Pipeline
    tokenizer, tokenizer_2, tokenizer_3 = make_clip_tokenizer(), make_clip_tokenizer("!"), t2i.make_tokenizer()
    torch.manual_seed(seed)
    free = config.clip_context_free
    encoders = dict(text_encoder=make_clip(tokenizer, config.clip_l_width, config.clip_projection, free),
                    text_encoder_2=make_clip(tokenizer_2, config.clip_g_width, config.clip_projection, free),
                    text_encoder_3=make_t5(config, len(tokenizer_3)))
    pipe = StableDiffusion3Pipeline(transformer=transformer or make_transformer(config), vae=vae or shipped_vae(),
                                    scheduler=make_scheduler(config), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                    tokenizer_3=tokenizer_3, **encoders)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- training --------------------------------------------------------------------------------------------------------
class CollapsedJointAttention:
    """diffusers' ``JointAttnProcessor2_0`` with ``key_bias`` (N, 1, 1, T + L) added to the attention logits: a key
    slot standing for m identical tokens gets log m, which is exactly attention over all of them (their queries'
    outputs are identical too, so one slot's output is each of theirs)."""

    def __init__(self):
        self.key_bias = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        n, image_tokens = hidden_states.shape[:2]

        def heads(x):
            return x.view(n, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        context = [heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
        query, key, value = (torch.cat([a, b], dim=2) for a, b in zip((query, key, value), context))
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=self.key_bias)
        out = out.transpose(1, 2).reshape(n, -1, query.shape[1] * query.shape[3])
        image, text = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


def collapsed_captions(pipe) -> dict[str, torch.Tensor]:
    """Every digit's caption of every training form, the empty prompt's last, as the pipeline encodes them
    (``encode_prompt``, max_sequence_length 256), with T5's identical padding tokens kept as few slots: ``embeds``
    (10, F + 1, CLIP_TOKENS + K, joint_attention_dim), ``key_bias`` (10, F + 1, CLIP_TOKENS + K) the log of
    the tokens each slot stands for, ``pooled`` (10, F + 1, pooled_projection_dim)."""
    captions = [t2i.caption(form, digit) for digit in range(10) for form in t2i.TRAIN_FORMS] + [""]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                  device="cpu", max_sequence_length=T5_TOKENS)
    ids = pipe.tokenizer_3(captions, padding="max_length", max_length=T5_TOKENS, truncation=True).input_ids
    real = [sum(token != pipe.tokenizer_3.pad_token_id for token in row) for row in ids]  # words and </s>
    slots = max(real) + 1
    clip = CLIP_TOKENS
    kept, bias = [], []
    for row, n in enumerate(real):
        pads = slots - n  # the padding tokens' slots, each standing for (T5_TOKENS - n) / pads identical tokens
        t5 = embeds[row, clip: clip + n + 1]
        kept.append(torch.cat([embeds[row, :clip + n], t5[-1:].expand(pads, -1)]))
        bias.append(torch.tensor([0.0] * (clip + n) + [math.log((T5_TOKENS - n) / pads)] * pads))
    forms = len(t2i.TRAIN_FORMS)

    def by_digit(x):  # (70 + 1, ...) -> (10, F + 1, ...): the empty prompt after each digit's forms
        return torch.cat([x[:-1].view(10, forms, *x.shape[1:]), x[-1:].expand(10, *x.shape[1:])[:, None]], dim=1)

    return {"embeds": by_digit(torch.stack(kept)), "key_bias": by_digit(torch.stack(bias)),
            "pooled": by_digit(pooled.float())}


def train_transformer(config: SD3Config, vae, captions: dict, seed: int = 0, progress: bool = True):
    """The SD3 transformer on the VAE's latents of the digits (a posterior sample each step, scaled as the pipeline
    scales them) with SD3's rectified-flow loss: MSE of the velocity ``noise - x0`` at ``x_s = (1 - s) x0 + s noise``,
    ``s = sigmoid(normal)``, the transformer's timestep ``1000 s``. ``captions``: :func:`collapsed_captions`.
    Returns the EMA transformer (eval mode, diffusers' attention processor)."""
    JointAttnProcessor2_0 = import_extra("diffusers", SD3_NEEDS).models.attention_processor.JointAttnProcessor2_0
    torch.manual_seed(seed)
    images, labels = (torch.from_numpy(a) for a in digits_dataset())
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    transformer = make_transformer(config)
    processor = CollapsedJointAttention()
    transformer.set_attn_processor(processor)
    num_forms = captions["embeds"].shape[1] - 1

    def batch_loss(model, generator):
        index = torch.randint(len(images), (config.batch_size,), generator=generator)
        form = torch.randint(num_forms, (config.batch_size,), generator=generator)
        dropped = torch.rand(config.batch_size, generator=generator) < config.caption_drop
        form = torch.where(dropped, torch.full_like(form, num_forms), form)
        digit = labels[index]
        sample = torch.randn(posterior.mean[index].shape, generator=generator)
        x0 = (posterior.mean[index] + posterior.std[index] * sample - shift) * scale
        noise = torch.randn(x0.shape, generator=generator)
        s = torch.sigmoid(torch.randn(config.batch_size, generator=generator)).view(-1, 1, 1, 1)
        xs = (1.0 - s) * x0 + s * noise
        # the digit is read from the prompt's tokens: a pooled embedding of another caption half the time keeps the
        # modulation from depending on it (with random causal CLIPs the held-out forms' pooled embeddings are new to
        # the model; context-free CLIPs give every caption the same one)
        swapped = torch.rand(config.batch_size, generator=generator) < config.pooled_swap
        pooled_digit = torch.where(swapped, torch.randint(10, (config.batch_size,), generator=generator), digit)
        pooled_form = torch.where(swapped, torch.randint(num_forms + 1, (config.batch_size,), generator=generator),
                                  form)
        bias = captions["key_bias"][digit, form]
        processor.key_bias = torch.cat([torch.zeros(len(bias), x0.shape[2] * x0.shape[3]), bias], 1)[:, None, None]
        velocity = model(xs, encoder_hidden_states=captions["embeds"][digit, form],
                         pooled_projections=captions["pooled"][pooled_digit, pooled_form],
                         timestep=1000.0 * s.flatten(), return_dict=False)[0]
        return ((velocity - (noise - x0)) ** 2).mean()

    ema = make_transformer(config)
    ema.set_attn_processor(processor)
    trained = fit(transformer, batch_loss, config.steps, lr=config.lr, ema_decay=config.ema_decay, seed=seed,
                  progress=progress, description="training the digits SD3 transformer", ema=ema)
    trained.set_attn_processor(JointAttnProcessor2_0())
    return trained


def train_sd3(config: SD3Config = SD3Config(), seed: int = 0, progress: bool = True):
    """The whole model: the transformer on ``t2i-digits``' VAE latents under the frozen encoders' captions. Returns
    the ``StableDiffusion3Pipeline``."""
    vae = shipped_vae()
    pipe = make_pipeline(config, vae=vae, seed=seed)
    pipe.transformer = train_transformer(config, vae, collapsed_captions(pipe), seed, progress)
    pipe.register_modules(transformer=pipe.transformer)
    return pipe


def save_sd3(pipe, folder: str | Path, config: SD3Config | None = None) -> Path:
    """``save_pretrained`` (fp32 safetensors), then the caption forms and sizes in ``captions.json`` beside."""
    from ..core.util import write_json

    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    info = {"train_forms": list(t2i.TRAIN_FORMS), "held_out_forms": list(t2i.HELD_OUT_FORMS),
            "digit_words": list(t2i.DIGIT_WORDS)}
    if config is not None:
        info["config"] = asdict(config)
    write_json(folder / "captions.json", info)
    return folder


# -- what the model draws --------------------------------------------------------------------------------------------
def load_pipeline(folder: str | Path = SD3_DIR):
    """diffusers' own ``StableDiffusion3Pipeline.from_pretrained(folder)``."""
    StableDiffusion3Pipeline = import_extra("diffusers", SD3_NEEDS).StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_accuracy(folder: str | Path = SD3_DIR, num_samples: int = 500, steps: int = SAMPLE_STEPS, seed: int = 0,
                    batch_size: int = 100, pipe=None) -> dict:
    """What diffusers' own ``StableDiffusion3Pipeline`` of the folder draws (``steps`` steps, its default guidance
    7.0 and max_sequence_length 256), read by the digits classifier: :func:`l2c_export.demo.t2i.sample_accuracy`
    (the accuracy overall, on training and held-out caption forms, and per form)."""
    return t2i.sample_accuracy(folder, num_samples, steps, seed, batch_size, pipe)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The t2i-digits-sd3 model: what diffusers' pipeline draws.")
    commands = parser.add_subparsers(dest="command", required=True)
    accuracy = commands.add_parser("accuracy", help="What diffusers' pipeline draws, read by the digits classifier.")
    accuracy.add_argument("--folder", type=Path, default=SD3_DIR)
    accuracy.add_argument("--num-samples", type=int, default=500)
    accuracy.add_argument("--steps", type=int, default=SAMPLE_STEPS)
    accuracy.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(sample_accuracy(args.folder, args.num_samples, args.steps, args.seed), indent=1))


if __name__ == "__main__":  # pragma: no cover
    main()
