"""The embedded text-to-video model ``t2v-digits``: a small Wan2.1 trained here on scikit-learn's digits, shipped as
the diffusers folder ``l2c_export/demo/t2v-digits/`` (what ``WanPipeline.save_pretrained`` writes).

- **Clips.** :data:`NUM_FRAMES` frames of :data:`FRAME` x :data:`FRAME` pixels (RGB, gray): an 8x8 digit at its own
  resolution crossing the frame one pixel a frame in the direction its prompt names (left, right, up or down), 8
  pixels from one edge to the other, centred on the other axis (:func:`make_clips`).
- **Prompts.** "a 3 moving left", "the digit seven going up", ...: :data:`TRAIN_FORMS` are trained on and measured,
  :data:`CONTEXT_FORMS` trained on in the last two rounds (they put numerals where the measured forms put words, and
  the other way round), :data:`HELD_OUT_FORMS` never (they recombine the trained words: each pair of their parts is
  trained on, the three together never). The tokenizer is t2i-digits' word-level one over these words (``<pad>`` 0,
  ``</s>`` 1 appended, as UMT5's).
- **Text encoder.** A small ``UMT5EncoderModel`` with random weights, frozen (as Wan freezes its UMT5). The model reads
  prompts at :data:`MAX_SEQUENCE_LENGTH` tokens (the pipeline's ``max_sequence_length``, 512 by default, must be
  given: Wan's cross-attention has no mask, so the zeroed rows past a prompt count, and the model was trained with 16).
- **VAE.** A small ``AutoencoderKLWan`` trained on the clips: (3, 5, 16, 16) -> (8, 2, 4, 4) latents, Wan's factors 4
  in time and in space; its ``latents_mean``/``latents_std`` make the clips' latents zero-mean, unit-variance per
  channel.
- **Transformer.** ``WanTransformer3DModel`` on the latents (patch (1, 1, 1): 32 tokens), trained with the flow
  matching objective Wan is trained with (velocity noise - x0 at sigma = shift(u), u uniform, timestep 1000 sigma),
  prompts dropped to the empty prompt's embedding with probability 0.1 for classifier-free guidance (the pipeline's
  negative prompt is ""), EMA weights.
- **Scheduler.** ``UniPCMultistepScheduler`` as Wan2.1's folders ship it (flow prediction, flow sigmas, shift 3),
  :data:`SAMPLE_STEPS` steps, the pipeline's guidance 5.

``l2c-export train-default --model t2v-digits`` reproduces the folder (:func:`train_t2v`); ``python -m
l2c_export.demo.t2v accuracy`` measures what diffusers' own ``WanPipeline`` draws (:func:`sample_accuracy`: the
digits classifier frame by frame, and the digit's centroid across the clip); ``python -m l2c_export.demo.t2v prompts``
writes the prompt embeddings its router is learned on.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.extras import import_extra
from .t2i import DIGIT_WORDS, make_tokenizer
from .train import digits_dataset, fit

T2V_NEEDS = "the t2v-digits demo (a WanPipeline)"

T2V_DIR = Path(__file__).parent / "t2v-digits"
FRAME, DIGIT, NUM_FRAMES = 16, 8, 5  # frame side, digit side (pixels), frames per clip (4k + 1)
# direction -> (dy, dx) per frame, in pixels (rows grow downwards)
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
TRAIN_FORMS = ("a {numeral} moving {direction}", "the digit {word} moving {direction}",
               "a handwritten {word} going {direction}", "number {numeral} sliding {direction}",
               "{word} moving {direction}", "the number {word} going {direction}")
HELD_OUT_FORMS = ("the digit {numeral} going {direction}", "a handwritten {numeral} sliding {direction}")
# Trained on in the last rounds (T2VConfig.context_rounds), never measured: each puts a numeral or a word where the
# measured forms put the other, or a verb after a prefix it did not follow, so that every pair of a held-out form's
# parts (prefix and numeral, numeral and verb, prefix and verb) is trained on and only the three together are new.
CONTEXT_FORMS = ("the digit {numeral} moving {direction}", "a handwritten {numeral} going {direction}",
                 "a {word} sliding {direction}", "number {word} going {direction}", "{numeral} sliding {direction}",
                 "the number {numeral} moving {direction}", "the digit {word} going {direction}",
                 "a handwritten {word} sliding {direction}")
MAX_SEQUENCE_LENGTH = 16  # the prompt length the model reads (WanPipeline's max_sequence_length)
SAMPLE_STEPS = 20  # num_inference_steps the model is measured and its router learned at
FLOW_SHIFT = 3.0  # Wan2.1 480p's


def caption(form: str, digit: int, direction: str) -> str:
    return form.format(word=DIGIT_WORDS[digit], numeral=str(digit), direction=direction)


def caption_vocabulary() -> list[str]:
    """Every word of every prompt form (held-out ones included), sorted."""
    return sorted({word for form in TRAIN_FORMS + CONTEXT_FORMS + HELD_OUT_FORMS for digit in range(10)
                   for direction in DIRECTIONS for word in caption(form, digit, direction).split()})


def digit_positions(direction: str) -> list[tuple[int, int]]:
    """The digit's top-left corner (row, column) in each of the :data:`NUM_FRAMES` frames: from one edge to the
    other along ``direction``, centred across it."""
    dy, dx = DIRECTIONS[direction]
    travel, middle = FRAME - DIGIT, (FRAME - DIGIT) // 2
    start_y = middle if dy == 0 else (0 if dy > 0 else travel)
    start_x = middle if dx == 0 else (0 if dx > 0 else travel)
    return [(start_y + dy * k * travel // (NUM_FRAMES - 1), start_x + dx * k * travel // (NUM_FRAMES - 1))
            for k in range(NUM_FRAMES)]


def make_clips(images: torch.Tensor, directions: list[str]) -> torch.Tensor:
    """images (n, 1, 8, 8) in [-1, 1], one direction each -> clips (n, 3, NUM_FRAMES, FRAME, FRAME) in [-1, 1], the
    background -1 (the VAE's and the pipeline's layout)."""
    clips = torch.full((len(images), 3, NUM_FRAMES, FRAME, FRAME), -1.0)
    for i, direction in enumerate(directions):
        for k, (y, x) in enumerate(digit_positions(direction)):
            clips[i, :, k, y: y + DIGIT, x: x + DIGIT] = images[i, 0]
    return clips


@dataclass(frozen=True)
class T2VConfig:
    """The sizes of the model and how it is trained (the shipped folder's are the defaults)."""

    # transformer (WanTransformer3DModel)
    num_layers: int = 4
    num_attention_heads: int = 2
    attention_head_dim: int = 32
    ffn_dim: int = 128
    # text encoder (UMT5EncoderModel)
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 4
    # VAE (AutoencoderKLWan)
    vae_base_dim: int = 8
    vae_dim_mult: tuple[int, ...] = (1, 2, 2)
    latent_channels: int = 8
    # training
    vae_frame_steps: int = 1500
    vae_steps: int = 400
    vae_decoder_steps: int = 600
    vae_batch_size: int = 16
    vae_kl_weight: float = 1e-4
    steps: int = 1500
    transformer_rounds: int = 3  # one-cycle rounds on TRAIN_FORMS
    context_rounds: int = 2  # then on TRAIN_FORMS + CONTEXT_FORMS
    batch_size: int = 32
    lr: float = 2e-3
    ema_decay: float = 0.999
    caption_drop: float = 0.1


# -- the parts -------------------------------------------------------------------------------------------------------
def make_text_encoder(config: T2VConfig, vocab_size: int):
    """A small UMT5 encoder (gated GELU, as Wan's UMT5-XXL) with random weights, frozen."""
    transformers = import_extra("transformers", T2V_NEEDS)
    umt5 = transformers.UMT5Config(vocab_size=vocab_size, d_model=config.text_width,
                                   d_kv=config.text_width // config.text_heads, d_ff=2 * config.text_width,
                                   num_layers=config.text_layers, num_heads=config.text_heads,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=32,
                                   dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                   use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return transformers.UMT5EncoderModel(umt5).eval().requires_grad_(False)


def make_vae(config: T2VConfig, latents_mean=None, latents_std=None):
    """Clips (N, 3, F, 16, 16) -> latents (N, latent_channels, (F - 1) / 4 + 1, 4, 4): Wan 2.1's causal 3-D VAE with
    two downsamplings, both in time too."""
    AutoencoderKLWan = import_extra("diffusers", T2V_NEEDS).AutoencoderKLWan
    channels = config.latent_channels
    return AutoencoderKLWan(base_dim=config.vae_base_dim, z_dim=channels, dim_mult=list(config.vae_dim_mult),
                            num_res_blocks=1, temperal_downsample=[True] * (len(config.vae_dim_mult) - 1),
                            latents_mean=list(latents_mean or [0.0] * channels),
                            latents_std=list(latents_std or [1.0] * channels),
                            scale_factor_temporal=4, scale_factor_spatial=2 ** (len(config.vae_dim_mult) - 1))


def make_transformer(config: T2VConfig):
    WanTransformer3DModel = import_extra("diffusers", T2V_NEEDS).WanTransformer3DModel
    return WanTransformer3DModel(patch_size=(1, 1, 1), num_attention_heads=config.num_attention_heads,
                                 attention_head_dim=config.attention_head_dim, in_channels=config.latent_channels,
                                 out_channels=config.latent_channels, text_dim=config.text_width, freq_dim=32,
                                 ffn_dim=config.ffn_dim, num_layers=config.num_layers, cross_attn_norm=True,
                                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def make_scheduler():
    """UniPC as Wan2.1's folders configure it: flow prediction on flow sigmas, shift 3 (480p's), bh2, order 2."""
    UniPCMultistepScheduler = import_extra("diffusers", T2V_NEEDS).UniPCMultistepScheduler
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT,
                                   num_train_timesteps=1000, solver_order=2, solver_type="bh2", predict_x0=True,
                                   lower_order_final=True, final_sigmas_type="zero")


# -- training --------------------------------------------------------------------------------------------------------
def _random_clips(images: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    index = torch.randint(len(images), (count,), generator=generator)
    directions = torch.randint(len(DIRECTIONS), (count,), generator=generator).tolist()
    return make_clips(images[index], [list(DIRECTIONS)[d] for d in directions])


def train_vae(config: T2VConfig, seed: int = 0, progress: bool = True):
    """The VAE first on single frames (a random frame of a random clip: the spatial path, five times cheaper a
    sample), then on random clips (a random digit in a random direction): MSE of the reconstruction of a sampled
    latent + ``vae_kl_weight`` x the KL to N(0, 1) per latent value. Returns it (eval mode, latents_mean and
    latents_std unset)."""
    torch.manual_seed(seed)
    images = torch.from_numpy(digits_dataset()[0])
    vae = make_vae(config)

    def loss_of(model, x, generator):
        posterior = model.encode(x).latent_dist
        reconstruction = model.decode(posterior.sample(generator)).sample
        kl = 0.5 * (posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar).mean()
        return ((reconstruction - x) ** 2).mean() + config.vae_kl_weight * kl

    def frame_loss(model, generator):
        clips = _random_clips(images, config.vae_batch_size, generator)
        frame = torch.randint(NUM_FRAMES, (len(clips),), generator=generator)
        return loss_of(model, clips[torch.arange(len(clips)), :, frame][:, :, None], generator)

    def clip_loss(model, generator):
        return loss_of(model, _random_clips(images, config.vae_batch_size, generator), generator)

    vae = fit(vae, frame_loss, config.vae_frame_steps, lr=config.lr, ema_decay=None, seed=seed, progress=progress,
              description="training the Wan VAE on frames").train()
    return fit(vae, clip_loss, config.vae_steps, lr=config.lr, ema_decay=None, seed=seed + 1, progress=progress,
               description="training the Wan VAE on clips")


def refine_decoder(vae, config: T2VConfig, seed: int = 0, progress: bool = True):
    """The VAE's decoder alone (its encoder frozen: the latents, and so the transformer trained on them, stay as they
    are) for ``vae_decoder_steps`` more steps on random clips: MSE of the reconstruction of a sampled latent.
    Returns the VAE (eval mode)."""
    images = torch.from_numpy(digits_dataset()[0])
    vae.requires_grad_(False)
    decoder = torch.nn.ModuleList([vae.post_quant_conv, vae.decoder]).requires_grad_(True)

    def batch_loss(model, generator):
        x = _random_clips(images, config.vae_batch_size, generator)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample(generator)
        return ((vae.decode(latents).sample - x) ** 2).mean()

    fit(decoder, batch_loss, config.vae_decoder_steps, lr=config.lr / 2, ema_decay=None, seed=seed + 2,
        progress=progress, description="refining the Wan VAE's decoder")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(vae, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every digit in every direction through the VAE's encoder: posterior means and stds (n, C, F', 4, 4), digits (n,),
    direction indices (n,) (n = 4 x 1797, direction-major)."""
    images, labels = (torch.from_numpy(a) for a in digits_dataset())
    means, stds = [], []
    for direction in DIRECTIONS:
        for start in range(0, len(images), batch_size):
            posterior = vae.encode(make_clips(images[start: start + batch_size], [direction] * len(
                images[start: start + batch_size]))).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    directions = torch.arange(len(DIRECTIONS)).repeat_interleave(len(images))
    return torch.cat(means), torch.cat(stds), labels.repeat(len(DIRECTIONS)), directions


def latent_statistics(means: torch.Tensor) -> tuple[list[float], list[float]]:
    """The per-channel mean and std of the clips' latent means (N, C, F', H', W'): latents_mean, latents_std."""
    per_channel = means.transpose(0, 1).flatten(1)
    return ([round(float(v), 4) for v in per_channel.mean(dim=1)], [round(float(v), 4) for v in per_channel.std(dim=1)])


def train_transformer(config: T2VConfig, vae, caption_embeds: torch.Tensor, seed: int = 0, progress: bool = True,
                      steps: int | None = None, dataset=None, start=None):
    """The Wan transformer on the VAE's normalised latents of every clip (a posterior sample each step) with flow
    matching: x_t = (1 - sigma) x0 + sigma noise, target noise - x0, sigma = shift u / (1 + (shift - 1) u) for u
    uniform (the sigmas the scheduler samples at), timestep 1000 sigma.

    caption_embeds (10, 4, P + 1, L, D): digit d's prompt in direction r of training form p as the text encoder
    encodes it (the pipeline's rows past the prompt zeroed); index P is the empty prompt's, which a prompt becomes
    with probability ``caption_drop``. ``start``: a transformer whose weights this round starts from (default: the
    seeded initial weights). Returns the EMA transformer (eval mode)."""
    torch.manual_seed(seed)
    means, stds, digits, directions = dataset if dataset is not None else encode_dataset(vae)
    shape = (1, -1, 1, 1, 1)
    latents_mean = torch.tensor(vae.config.latents_mean).view(shape)
    latents_std = torch.tensor(vae.config.latents_std).view(shape)
    transformer = make_transformer(config)
    ema = make_transformer(config)
    if start is not None:  # a further round: from the previous round's (EMA) weights
        transformer.load_state_dict(start.state_dict())
    num_forms = caption_embeds.shape[2] - 1

    def batch_loss(model, generator):
        index = torch.randint(len(means), (config.batch_size,), generator=generator)
        form = torch.randint(num_forms, (config.batch_size,), generator=generator)
        dropped = torch.rand(config.batch_size, generator=generator) < config.caption_drop
        form = torch.where(dropped, torch.full_like(form, num_forms), form)
        sample = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        x0 = (sample - latents_mean) / latents_std
        noise = torch.randn(x0.shape, generator=generator)
        u = torch.rand(config.batch_size, generator=generator)
        sigma = FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)
        xt = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
        velocity = model(xt, timestep=sigma * 1000, encoder_hidden_states=caption_embeds[digits[index],
                         directions[index], form], return_dict=False)[0]
        return ((velocity - (noise - x0)) ** 2).mean()

    return fit(transformer, batch_loss, steps or config.steps, lr=config.lr, ema_decay=config.ema_decay, seed=seed,
               progress=progress, description="training the digits Wan transformer", ema=ema)


def encode_prompts(pipe, prompts: list[str], negative: bool = False) -> dict[str, torch.Tensor]:
    """The pipeline's own ``encode_prompt`` at :data:`MAX_SEQUENCE_LENGTH`: prompt_embeds (n, L, D) and, with
    ``negative``, negative_prompt_embeds (the empty prompt's, as the pipeline's default)."""
    with torch.no_grad():
        embeds, negative_embeds = pipe.encode_prompt(prompts, do_classifier_free_guidance=negative, device="cpu",
                                                     max_sequence_length=MAX_SEQUENCE_LENGTH)
    arrays = {"prompt_embeds": embeds.float()}
    if negative:
        arrays["negative_prompt_embeds"] = negative_embeds.float()
    return arrays


def training_captions(pipe, forms: tuple[str, ...] = TRAIN_FORMS) -> torch.Tensor:
    """(10, 4, P + 1, L, D) embeddings of every digit's prompt in every direction of each of the P ``forms``, the
    empty prompt's last."""
    prompts = [caption(form, digit, direction) for digit in range(10) for direction in DIRECTIONS
               for form in forms] + [""]
    longest = max(len(pipe.tokenizer(text).input_ids) for text in prompts)
    if longest > MAX_SEQUENCE_LENGTH:
        raise ValueError(f"a prompt has {longest} tokens; MAX_SEQUENCE_LENGTH is {MAX_SEQUENCE_LENGTH}")
    embeds = encode_prompts(pipe, prompts)["prompt_embeds"]
    empty = embeds[-1:].expand(10 * len(DIRECTIONS), -1, -1)[:, None]
    embeds = torch.cat([embeds[:-1].view(10 * len(DIRECTIONS), len(forms), *embeds.shape[1:]), empty], dim=1)
    return embeds.view(10, len(DIRECTIONS), len(forms) + 1, *embeds.shape[2:])


def make_pipeline(config: T2VConfig, transformer=None, vae=None, seed: int = 0):
    """A ``WanPipeline`` of the parts (untrained where not given); the text encoder is seeded by ``seed``."""
    WanPipeline = import_extra("diffusers", T2V_NEEDS).WanPipeline
    tokenizer = make_tokenizer(caption_vocabulary())
    torch.manual_seed(seed)
    text_encoder = make_text_encoder(config, len(tokenizer))
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae or make_vae(config),
                       transformer=transformer or make_transformer(config), scheduler=make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_t2v(config: T2VConfig = T2VConfig(), seed: int = 0, progress: bool = True):
    """The whole model: the VAE (its latents' statistics then set), then the transformer on its latents under the
    frozen text encoder's prompts (``transformer_rounds`` rounds on :data:`TRAIN_FORMS`, then ``context_rounds`` on
    :data:`CONTEXT_FORMS` too), then the VAE's decoder refined (:func:`refine_decoder`). Returns the
    ``WanPipeline``."""
    torch.set_num_threads(1)  # the training's arithmetic, whatever the machine: one thread (reproducible, shared)
    vae = train_vae(config, seed, progress).eval().requires_grad_(False)
    dataset = encode_dataset(vae)
    latents_mean, latents_std = latent_statistics(dataset[0])
    vae.register_to_config(latents_mean=latents_mean, latents_std=latents_std)
    pipe = make_pipeline(config, vae=vae, seed=seed)
    embeds = training_captions(pipe)
    transformer = None
    for round_ in range(config.transformer_rounds):  # each round a one-cycle schedule from the last round's EMA
        transformer = train_transformer(config, vae, embeds, seed + round_, progress, dataset=dataset,
                                        start=transformer)
    transformer = train_context_rounds(config, pipe, transformer, seed + config.transformer_rounds, progress, dataset)
    pipe.transformer = transformer
    pipe.register_modules(transformer=pipe.transformer)
    refine_decoder(vae, config, seed, progress)
    return pipe


def train_context_rounds(config: T2VConfig, pipe, transformer, seed: int, progress: bool = True, dataset=None):
    """``config.context_rounds`` more rounds from ``transformer`` on the prompts of :data:`TRAIN_FORMS` and
    :data:`CONTEXT_FORMS` (round k seeded ``seed + k``; ``dataset``: :func:`encode_dataset` of the pipeline's VAE,
    whose encoder :func:`refine_decoder` leaves as it is). Returns the last round's EMA transformer (``transformer``
    itself after no round)."""
    if config.context_rounds:
        embeds = training_captions(pipe, TRAIN_FORMS + CONTEXT_FORMS)
        dataset = dataset if dataset is not None else encode_dataset(pipe.vae)
    for round_ in range(config.context_rounds):
        transformer = train_transformer(config, pipe.vae, embeds, seed + round_, progress, dataset=dataset,
                                        start=transformer)
    return transformer


def save_t2v(pipe, folder: str | Path, config: T2VConfig | None = None) -> Path:
    """``save_pretrained`` (fp32 safetensors), then the prompt forms and the clips' geometry in ``captions.json``
    beside (diffusers ignores it)."""
    from ..core.util import write_json

    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    info = {"train_forms": list(TRAIN_FORMS), "context_forms": list(CONTEXT_FORMS),
            "held_out_forms": list(HELD_OUT_FORMS),
            "digit_words": list(DIGIT_WORDS), "directions": list(DIRECTIONS), "num_frames": NUM_FRAMES,
            "height": FRAME, "width": FRAME, "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "num_inference_steps": SAMPLE_STEPS}
    if config is not None:
        info["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    write_json(folder / "captions.json", info)
    return folder


# -- what the model draws --------------------------------------------------------------------------------------------
def load_pipeline(folder: str | Path = T2V_DIR):
    """diffusers' own ``WanPipeline.from_pretrained(folder)``."""
    WanPipeline = import_extra("diffusers", T2V_NEEDS).WanPipeline
    pipe = WanPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_kwargs(steps: int = SAMPLE_STEPS) -> dict:
    """The pipeline's arguments the model is sampled with: its clip, its prompt length, ``steps`` steps."""
    return {"height": FRAME, "width": FRAME, "num_frames": NUM_FRAMES, "num_inference_steps": steps,
            "max_sequence_length": MAX_SEQUENCE_LENGTH}


@torch.no_grad()
def decode_latents(vae, latents: np.ndarray) -> np.ndarray:
    """The pipeline's decoding: latents (n, C, F', H', W') -> clips (n, 3, F, H, W) in [-1, 1] (clipped), through
    the VAE's latents_mean and latents_std."""
    shape = (1, -1, 1, 1, 1)
    latents = torch.from_numpy(np.asarray(latents, dtype=np.float32))
    latents = latents * torch.tensor(vae.config.latents_std).view(shape) + torch.tensor(vae.config.latents_mean).view(
        shape)
    return vae.decode(latents).sample.clamp(-1.0, 1.0).numpy()


def evaluation_prompts(num_samples: int) -> list[tuple[str, int, str, bool]]:
    """``num_samples`` (prompt, digit, direction, held_out): every form with every direction and digit (320), in a
    fixed shuffled order, cycled."""
    forms = [(form, False) for form in TRAIN_FORMS] + [(form, True) for form in HELD_OUT_FORMS]
    triples = list(itertools.product(range(len(forms)), DIRECTIONS, range(10)))
    order = np.random.default_rng(0).permutation(len(triples))
    chosen = itertools.islice(itertools.cycle([triples[i] for i in order]), num_samples)
    return [(caption(forms[f][0], digit, direction), digit, direction, forms[f][1]) for f, direction, digit in chosen]


@torch.no_grad()
def read_clips(frames: np.ndarray, classifier=None) -> dict[str, np.ndarray]:
    """frames (n, F, H, W, 3) in [0, 1] (the pipeline's ``output_type="np"``) -> per frame the digits classifier's
    digit (n, F) on the 8x8 window holding the most ink, and the ink's centroid (n, F, 2) (row, column)."""
    from .classifier import load_classifier

    classifier = classifier or load_classifier()
    gray = torch.from_numpy(np.asarray(frames, dtype=np.float32)).mean(dim=-1)  # (n, F, H, W) in [0, 1]
    n, num_frames, height, width = gray.shape
    ink = gray.reshape(n * num_frames, 1, height, width)
    window = F.avg_pool2d(ink, DIGIT, stride=1).flatten(1).argmax(dim=1)  # top-left corner of the inkiest window
    columns = width - DIGIT + 1
    crops = torch.stack([ink[i, :, int(w) // columns: int(w) // columns + DIGIT,
                             int(w) % columns: int(w) % columns + DIGIT] for i, w in enumerate(window)])
    digits = classifier(crops * 2.0 - 1.0).argmax(dim=1).view(n, num_frames)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
    mass = ink[:, 0].clamp(min=0).flatten(1).sum(dim=1).clamp(min=1e-6)
    centroid = torch.stack([(ink[:, 0] * rows).flatten(1).sum(dim=1) / mass,
                            (ink[:, 0] * cols).flatten(1).sum(dim=1) / mass], dim=1).view(n, num_frames, 2)
    return {"digits": digits.numpy(), "centroids": centroid.numpy()}


def judge_clips(frames: np.ndarray, digits: list[int], directions: list[str], classifier=None) -> dict[str, np.ndarray]:
    """Whether each clip (n, F, H, W, 3) draws its digit and moves it as asked: ``digit_ok`` when the classifier reads
    the digit in at least 2/3 of the frames, ``motion_ok`` when the ink's centroid moves, first frame to last, at least
    half the true travel (8 pixels) along the direction and at most 2 pixels across it; ``ok`` both."""
    read = read_clips(frames, classifier)
    frame_ok = read["digits"] == np.asarray(digits)[:, None]
    shift = read["centroids"][:, -1] - read["centroids"][:, 0]  # (n, 2): (rows, columns)
    unit = np.array([DIRECTIONS[d] for d in directions], dtype=np.float64)
    along = (shift * unit).sum(axis=1)
    across = np.abs(shift[:, 0] * unit[:, 1] - shift[:, 1] * unit[:, 0])
    digit_ok = frame_ok.mean(axis=1) >= 2 / 3
    motion_ok = (along >= (FRAME - DIGIT) / 2) & (across <= 2)
    return {"frame_ok": frame_ok, "digit_ok": digit_ok, "motion_ok": motion_ok, "ok": digit_ok & motion_ok}


@torch.no_grad()
def sample_accuracy(folder: str | Path = T2V_DIR, num_samples: int = 320, steps: int = SAMPLE_STEPS, seed: int = 0,
                    batch_size: int = 40, pipe=None) -> dict:
    """Samples the folder with diffusers' own ``WanPipeline`` (:func:`sample_kwargs`, its default guidance 5) and
    judges each clip (:func:`judge_clips`). Returns the fractions of clips right overall, on training and held-out
    forms, of clips drawing their digit, moving as asked, and of frames read as the digit."""
    pipe = pipe or load_pipeline(folder)
    from .classifier import load_classifier

    classifier = load_classifier()
    prompts = evaluation_prompts(num_samples)
    generator = torch.Generator().manual_seed(seed)
    verdicts = []
    for start in range(0, num_samples, batch_size):
        chunk = prompts[start: start + batch_size]
        frames = pipe([text for text, _, _, _ in chunk], generator=generator, output_type="np",
                      **sample_kwargs(steps)).frames
        verdicts.append(judge_clips(frames, [d for _, d, _, _ in chunk], [r for _, _, r, _ in chunk], classifier))
    verdict = {key: np.concatenate([v[key] for v in verdicts]) for key in verdicts[0]}
    held_out = np.array([flag for _, _, _, flag in prompts])
    ok = verdict["ok"]
    return {"num_samples": num_samples, "steps": steps, "accuracy": float(ok.mean()),
            "train_forms": float(ok[~held_out].mean()) if (~held_out).any() else None,
            "held_out_forms": float(ok[held_out].mean()) if held_out.any() else None,
            "digit_drawn": float(verdict["digit_ok"].mean()), "moves_as_asked": float(verdict["motion_ok"].mean()),
            "frames_read_as_digit": float(verdict["frame_ok"].mean())}


def prompt_conditioning(pipe, prompts: list[str]) -> dict[str, np.ndarray]:
    """``prompts`` encoded as the pipeline encodes them (the negative prompt "") at :data:`MAX_SEQUENCE_LENGTH`:
    the arrays of ``run --conditioning`` and ``learn --conditioning-data``, float32."""
    return {name: value.numpy() for name, value in encode_prompts(pipe, prompts, negative=True).items()}


def learning_prompts() -> list[str]:
    """Every digit in every direction with every training form (240)."""
    return [caption(form, digit, direction) for form in TRAIN_FORMS for direction in DIRECTIONS
            for digit in range(10)]


def write_learning_prompts(out: str | Path, folder: str | Path = T2V_DIR) -> Path:
    """The prompts the router is learned on (:func:`learning_prompts`) from the folder's own tokenizer and UMT5, as
    an .npz."""
    import io

    from ..core.util import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, **prompt_conditioning(load_pipeline(folder), learning_prompts()))
    atomic_write_bytes(Path(out), buffer.getvalue())
    return Path(out)


def demo_prompts() -> list[tuple[str, int, str]]:
    """One prompt per digit (prompt, digit, direction): the directions and the forms in turn (6 and 7 of the
    held-out forms)."""
    forms = TRAIN_FORMS + HELD_OUT_FORMS
    return [(caption(forms[digit % len(forms)], digit, list(DIRECTIONS)[digit % len(DIRECTIONS)]), digit,
             list(DIRECTIONS)[digit % len(DIRECTIONS)]) for digit in range(10)]


def full_and_learned_clips(engines: str | Path, out: str | Path, seed: int = 1) -> dict:
    """A build of the model (``build --model t2v-digits``) run on ONNX Runtime on :func:`demo_prompts` (encoded by
    the build's own tokenizer and UMT5 graph, as ``run --prompt``), at full compute and with its schedule from the
    same noise, decoded by the build's VAE decoder graph: one animated image (``.gif``/``.webp``) with full
    compute's clips on the top row and the schedule's below. Returns each row's verdicts (:func:`judge_clips`: the
    fraction of clips right)."""
    from ..core.images import save_clip
    from ..runtime.pipeline import L2CPipeline

    prompts = demo_prompts()
    pipe = L2CPipeline.from_engine_dir(engines)
    rows, verdicts = [], {}
    for name, full in (("full", True), ("learned", False)):
        result = pipe(prompt=[text for text, _, _ in prompts], seed=seed, full=full, decode=True)
        clips = np.clip(result.decoded, -1.0, 1.0)  # (n, 3, F, H, W)
        rows.append(clips)
        frames = (clips.transpose(0, 2, 3, 4, 1) + 1.0) / 2.0
        verdicts[name] = float(judge_clips(frames, [d for _, d, _ in prompts], [r for _, _, r in prompts])["ok"].mean())
    save_clip(np.concatenate(rows), out, columns=len(prompts), scale=8, fps=4)
    return verdicts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The t2v-digits model: its accuracy, its learning prompts.")
    commands = parser.add_subparsers(dest="command", required=True)
    accuracy = commands.add_parser("accuracy", help="What diffusers' WanPipeline draws, judged frame by frame.")
    accuracy.add_argument("--folder", type=Path, default=T2V_DIR)
    accuracy.add_argument("--num-samples", type=int, default=320)
    accuracy.add_argument("--steps", type=int, default=SAMPLE_STEPS)
    accuracy.add_argument("--seed", type=int, default=0)
    accuracy.add_argument("--json", type=Path, help="Also write the result here.")
    prompts = commands.add_parser("prompts", help="The router's learning prompts (.npz) from the folder's UMT5.")
    prompts.add_argument("--folder", type=Path, default=T2V_DIR)
    prompts.add_argument("--out", type=Path, required=True)
    clips = commands.add_parser("clips", help="Full compute's and the schedule's clips of a build, one animated image.")
    clips.add_argument("engines", type=Path, help="A build of the model (l2c-export build --model t2v-digits).")
    clips.add_argument("--out", type=Path, required=True, help="The .gif or .webp to write.")
    clips.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "clips":
        verdicts = full_and_learned_clips(args.engines, args.out, args.seed)
        print(f"wrote {args.out} (top: full compute, {100 * verdicts['full']:.0f}% of clips right; below: the "
              f"schedule, {100 * verdicts['learned']:.0f}%)")
    elif args.command == "accuracy":
        result = sample_accuracy(args.folder, args.num_samples, args.steps, args.seed)
        print(json.dumps(result, indent=1))
        if args.json:
            from ..core.util import write_json

            write_json(args.json, result)
    else:
        print(f"wrote {write_learning_prompts(args.out, args.folder)}")


if __name__ == "__main__":  # pragma: no cover
    main()
