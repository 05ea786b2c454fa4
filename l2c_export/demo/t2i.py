"""The embedded text-to-image model ``t2i-digits``: a small PixArt-α trained here on scikit-learn's digits, shipped as
the diffusers folder ``l2c_export/demo/t2i-digits/`` (what ``PixArtAlphaPipeline.save_pretrained`` writes).

- **Captions.** Each digit has captions of several forms ("a handwritten seven", "the digit 7", "number seven", ...);
  :data:`TRAIN_FORMS` are trained on, :data:`HELD_OUT_FORMS` never (they recombine the trained words).
- **Tokenizer.** A word-level ``tokenizers`` tokenizer over the caption vocabulary (lower-cased, split on whitespace
  and punctuation, ``</s>`` appended, ``<pad>`` id 0 and ``</s>`` id 1 as T5's; unknown words are ``<unk>``), saved as
  ``tokenizer/tokenizer.json`` and loaded by transformers as a ``PreTrainedTokenizerFast``.
- **Text encoder.** A small ``T5EncoderModel`` with random weights, frozen (PixArt freezes its T5): the transformer
  learns to read it.
- **VAE.** A small ``AutoencoderKL`` trained on the digits: 8x8x1 images in [-1, 1] -> 4x4x4 latents (one
  down-sampling, ``vae_scale_factor`` 2; no attention in its mid-block); its ``scaling_factor`` makes the latents of
  the digits unit-variance.
- **Transformer.** ``PixArtTransformer2DModel`` on the 4x4x4 latents (patch 1), learned sigma, trained with DiT's
  (PixArt's) objective on the 1000-step linear schedule, captions dropped to the empty prompt's embedding with
  probability 0.1 for classifier-free guidance (the pipeline's negative prompt is ""), EMA weights.
- **Scheduler.** ``DPMSolverMultistepScheduler`` as PixArt-α ships it (DPM-Solver++ 2M, linear betas), 20 steps.

``l2c-export train-default --model t2i-digits`` reproduces the folder (:func:`train_t2i`); ``python -m
l2c_export.demo.t2i accuracy`` measures what diffusers' own pipeline draws with the digits classifier
(:func:`sample_accuracy`); ``python -m l2c_export.demo.t2i prompts`` writes the prompt embeddings its router is
learned on (:func:`write_learning_prompts`).
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.extras import import_extra
from .train import DiffusionLoss, digits_dataset, fit

T2I_NEEDS = "the t2i-digits demo (a PixArtAlphaPipeline)"

T2I_DIR = Path(__file__).parent / "t2i-digits"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_FORMS = ("a handwritten {word}", "the digit {numeral}", "number {word}", "a picture of the digit {word}",
               "{numeral}", "an image of a handwritten {numeral}", "the handwritten number {word}")
HELD_OUT_FORMS = ("the number {numeral}", "a handwritten digit {word}", "a picture of a {numeral}")
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: T5's pad and eos ids
TRAIN_CAPTION_TOKENS = 16  # captions are padded to this while training (masked: the same as the pipeline's 120)
SAMPLE_STEPS = 20  # num_inference_steps the model is measured and its router learned at


def caption(form: str, digit: int) -> str:
    return form.format(word=DIGIT_WORDS[digit], numeral=str(digit))


def caption_vocabulary() -> list[str]:
    """Every word of every caption form (held-out ones included), sorted."""
    words = {word for form in TRAIN_FORMS + HELD_OUT_FORMS for digit in range(10)
             for word in caption(form, digit).split()}
    return sorted(words)


@dataclass(frozen=True)
class T2IConfig:
    """The sizes of the model and how it is trained (the shipped folder's are the defaults)."""

    # transformer (PixArtTransformer2DModel)
    num_layers: int = 4
    num_attention_heads: int = 3
    attention_head_dim: int = 32
    # text encoder (T5EncoderModel)
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    # VAE (AutoencoderKL)
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4
    # training
    vae_steps: int = 1000
    vae_kl_weight: float = 1e-3
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    ema_decay: float = 0.999
    caption_drop: float = 0.1

    @property
    def latent_size(self) -> int:
        return 8 // 2 ** (len(self.vae_channels) - 1)


# -- the parts -------------------------------------------------------------------------------------------------------
def make_tokenizer(words: list[str] | None = None):
    """The word-level tokenizer over ``words`` (default :func:`caption_vocabulary`), as transformers loads it from
    ``tokenizer.json``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    PreTrainedTokenizerFast = import_extra("transformers", T2I_NEEDS).PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(words or caption_vocabulary()))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                              special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def make_text_encoder(config: T2IConfig, vocab_size: int):
    """A small T5 v1.1 encoder (gated GELU, as PixArt's T5-XXL) with random weights, frozen."""
    transformers = import_extra("transformers", T2I_NEEDS)
    T5Config, T5EncoderModel = transformers.T5Config, transformers.T5EncoderModel

    t5 = T5Config(vocab_size=vocab_size, d_model=config.text_width, d_kv=config.text_width // config.text_heads,
                  d_ff=2 * config.text_width, num_layers=config.text_layers, num_heads=config.text_heads,
                  relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(t5).eval().requires_grad_(False)


def make_vae(config: T2IConfig):
    """8x8x1 images in [-1, 1] -> (latent_channels, 8 / 2 ** (levels - 1), ...) latents."""
    AutoencoderKL = import_extra("diffusers", T2I_NEEDS).AutoencoderKL
    levels = len(config.vae_channels)
    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=config.vae_channels,
                         layers_per_block=1, latent_channels=config.latent_channels, norm_num_groups=8,
                         sample_size=8, mid_block_add_attention=False)


def make_transformer(config: T2IConfig):
    PixArtTransformer2DModel = import_extra("diffusers", T2I_NEEDS).PixArtTransformer2DModel
    inner = config.num_attention_heads * config.attention_head_dim
    return PixArtTransformer2DModel(num_attention_heads=config.num_attention_heads,
                                    attention_head_dim=config.attention_head_dim,
                                    in_channels=config.latent_channels, out_channels=2 * config.latent_channels,
                                    num_layers=config.num_layers, cross_attention_dim=inner,
                                    caption_channels=config.text_width, sample_size=config.latent_size,
                                    patch_size=1)


def make_scheduler():
    """DPM-Solver++ 2M as PixArt-α's folders configure it (these are diffusers' defaults)."""
    DPMSolverMultistepScheduler = import_extra("diffusers", T2I_NEEDS).DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                       num_train_timesteps=1000, solver_order=2, prediction_type="epsilon",
                                       algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                                       timestep_spacing="linspace", steps_offset=0)


# -- training --------------------------------------------------------------------------------------------------------
def train_vae(config: T2IConfig, seed: int = 0, progress: bool = True):
    """The VAE on the digits (random one-pixel shifts): MSE of the reconstruction of a sampled latent +
    ``vae_kl_weight`` x the KL to N(0, 1) per latent value. Returns it (eval mode) with ``scaling_factor`` set to
    1 / std of the digits' latent means."""
    torch.manual_seed(seed)
    images = torch.from_numpy(digits_dataset()[0])
    vae = make_vae(config)

    def batch_loss(model, generator):
        index = torch.randint(len(images), (config.batch_size,), generator=generator)
        shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
        x = torch.roll(images[index], shifts=shift, dims=(2, 3))
        posterior = model.encode(x).latent_dist
        reconstruction = model.decode(posterior.sample()).sample
        kl = 0.5 * (posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar).mean()
        return ((reconstruction - x) ** 2).mean() + config.vae_kl_weight * kl

    vae = fit(vae, batch_loss, config.vae_steps, lr=1e-3, ema_decay=None, seed=seed, progress=progress,
              description="training the digits VAE")
    with torch.no_grad():
        means = vae.encode(images).latent_dist.mean
    vae.register_to_config(scaling_factor=round(float(1.0 / means.std()), 4))
    return vae


def train_transformer(config: T2IConfig, vae, caption_embeds: torch.Tensor, caption_masks: torch.Tensor,
                      seed: int = 0, progress: bool = True, steps: int | None = None):
    """The PixArt transformer on the VAE's latents of the digits (a posterior sample each step, times
    ``scaling_factor``) with DiT's objective (eps MSE + the variational bound of the learned sigma).

    caption_embeds (10, F, L, D), caption_masks (10, F, L): digit d's caption of training form f as the text encoder
    encodes it; index F (one past the last form) is the empty prompt's, which a caption becomes with probability
    ``caption_drop``. Returns the EMA transformer (eval mode)."""
    torch.manual_seed(seed)
    images, labels = (torch.from_numpy(a) for a in digits_dataset())
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    scale = vae.config.scaling_factor
    transformer = make_transformer(config)
    loss = DiffusionLoss()
    num_forms = caption_embeds.shape[1] - 1
    steps = steps or config.steps

    def batch_loss(model, generator):
        index = torch.randint(len(images), (config.batch_size,), generator=generator)
        form = torch.randint(num_forms, (config.batch_size,), generator=generator)
        dropped = torch.rand(config.batch_size, generator=generator) < config.caption_drop
        form = torch.where(dropped, torch.full_like(form, num_forms), form)
        digit = labels[index]
        noise = torch.randn(posterior.mean[index].shape, generator=generator)
        x0 = (posterior.mean[index] + posterior.std[index] * noise) * scale
        t = torch.randint(1000, (config.batch_size,), generator=generator)

        def predict(xt, timestep, _):
            return model(xt, encoder_hidden_states=caption_embeds[digit, form],
                         encoder_attention_mask=caption_masks[digit, form], timestep=timestep,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]

        return loss(predict, x0, digit, t)

    return fit(transformer, batch_loss, steps, lr=config.lr, ema_decay=config.ema_decay, seed=seed,
               progress=progress, description="training the digits PixArt transformer")


def encode_captions(pipe, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own ``encode_prompt`` (no caption cleaning, no guidance): embeds (n, L, D), mask (n, L)."""
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device="cpu",
                                                clean_caption=False, max_sequence_length=max_length)
    return embeds.float(), mask.float()


def training_captions(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(10, F + 1, L, D) embeddings and (10, F + 1, L) masks of every digit's caption of every training form, the
    empty prompt's last, at :data:`TRAIN_CAPTION_TOKENS`."""
    captions = [caption(form, digit) for digit in range(10) for form in TRAIN_FORMS] + [""]
    longest = max(len(pipe.tokenizer(text).input_ids) for text in captions)
    if longest > TRAIN_CAPTION_TOKENS:
        raise ValueError(f"a caption has {longest} tokens; TRAIN_CAPTION_TOKENS is {TRAIN_CAPTION_TOKENS}")
    embeds, mask = encode_captions(pipe, captions, TRAIN_CAPTION_TOKENS)
    forms = len(TRAIN_FORMS)
    empty_embeds, empty_mask = embeds[-1:].expand(10, -1, -1)[:, None], mask[-1:].expand(10, -1)[:, None]
    embeds = torch.cat([embeds[:-1].view(10, forms, *embeds.shape[1:]), empty_embeds], dim=1)
    mask = torch.cat([mask[:-1].view(10, forms, -1), empty_mask], dim=1)
    return embeds, mask


def make_pipeline(config: T2IConfig, transformer=None, vae=None, seed: int = 0):
    """A ``PixArtAlphaPipeline`` of the parts (untrained where not given); the text encoder is seeded by ``seed``."""
    PixArtAlphaPipeline = import_extra("diffusers", T2I_NEEDS).PixArtAlphaPipeline
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    text_encoder = make_text_encoder(config, len(tokenizer))
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae or make_vae(config),
                               transformer=transformer or make_transformer(config), scheduler=make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_t2i(config: T2IConfig = T2IConfig(), seed: int = 0, progress: bool = True):
    """The whole model: the VAE, then the transformer on its latents under the frozen text encoder's captions.
    Returns the ``PixArtAlphaPipeline``."""
    vae = train_vae(config, seed, progress).eval().requires_grad_(False)
    pipe = make_pipeline(config, vae=vae, seed=seed)
    embeds, mask = training_captions(pipe)
    pipe.transformer = train_transformer(config, vae, embeds, mask, seed, progress)
    pipe.register_modules(transformer=pipe.transformer)
    return pipe


def save_t2i(pipe, folder: str | Path, config: T2IConfig | None = None) -> Path:
    """``save_pretrained`` (fp32 safetensors), then the caption forms the model was trained on and held out from, and
    its sizes, in ``captions.json`` beside (diffusers ignores it)."""
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    from ..core.util import write_json

    info = {"train_forms": list(TRAIN_FORMS), "held_out_forms": list(HELD_OUT_FORMS),
            "digit_words": list(DIGIT_WORDS)}
    if config is not None:
        info["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    write_json(folder / "captions.json", info)
    return folder


# -- what the model draws --------------------------------------------------------------------------------------------
# What diffusers' pipeline of a text-to-image digits folder is called with besides prompts, steps, guidance and latents:
# PixArt-α's caption cleaning (it needs bs4 and ftfy) and resolution binning (PixArt's 256-1024 px sizes only) off.
def load_pipeline(folder: str | Path = T2I_DIR):
    """diffusers' own pipeline of the folder, ``DiffusionPipeline.from_pretrained(folder)``: the class its
    ``model_index.json`` names (``PixArtAlphaPipeline`` for t2i-digits, ``StableDiffusion3Pipeline`` for
    t2i-digits-sd3)."""
    DiffusionPipeline = import_extra("diffusers", T2I_NEEDS).DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_class(folder: str | Path) -> str:
    """The pipeline class the folder's ``model_index.json`` names."""
    return json.loads((Path(folder) / "model_index.json").read_text())["_class_name"]


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's latents (n, C, h, w) decoded as it decodes them, ``vae.decode(latents / scaling_factor +
    shift_factor)`` (no shift where the config has none): images (n, 1, 8, 8), float32, clamped to [-1, 1] as its
    postprocess clamps."""
    config = pipe.vae.config
    shift = getattr(config, "shift_factor", None) or 0.0
    return pipe.vae.decode(latents / config.scaling_factor + shift).sample.float().clamp(-1.0, 1.0)


def evaluation_prompts(num_samples: int) -> list[tuple[str, int, bool]]:
    """``num_samples`` (caption, digit, held_out) cycling through the digits and through all caption forms."""
    forms = [(form, False) for form in TRAIN_FORMS] + [(form, True) for form in HELD_OUT_FORMS]
    pairs = itertools.product(range(len(forms)), range(10))  # every form with every digit before any repeats
    chosen = list(itertools.islice(itertools.cycle(pairs), num_samples))
    return [(caption(forms[f][0], digit), digit, forms[f][1]) for f, digit in chosen]


@torch.no_grad()
def sample_accuracy(folder: str | Path = T2I_DIR, num_samples: int = 500, steps: int = SAMPLE_STEPS, seed: int = 0,
                    batch_size: int = 100, pipe=None) -> dict:
    """Samples the folder with diffusers' own pipeline (:func:`load_pipeline`: ``PixArtAlphaPipeline``, or
    ``StableDiffusion3Pipeline`` for t2i-digits-sd3; ``steps`` steps, its default guidance, 4.5 or 7.0;
    ``use_resolution_binning=False``: PixArt's pipeline bins only its 256-1024 px sizes) and reads each image with
    the digits classifier. Returns the accuracy overall, on training and held-out caption forms, and per form."""
    from .classifier import load_classifier
    from .diffusers_caches import call_options

    pipe = pipe or load_pipeline(folder)
    classifier = load_classifier()
    prompts = evaluation_prompts(num_samples)
    generator = torch.Generator().manual_seed(seed)
    predicted = []
    for start in range(0, num_samples, batch_size):
        chunk = [text for text, _, _ in prompts[start: start + batch_size]]
        images = pipe(chunk, num_inference_steps=steps, generator=generator, output_type="pt",
                      **call_options(pipe, None)).images  # (n, 1, 8, 8) in [0, 1]
        predicted.append(classifier(images * 2.0 - 1.0).argmax(dim=1).numpy())
    predicted = np.concatenate(predicted)
    digits = np.array([digit for _, digit, _ in prompts])
    held_out = np.array([flag for _, _, flag in prompts])
    correct = predicted == digits
    per_form = {}
    for form in TRAIN_FORMS + HELD_OUT_FORMS:
        rows = [i for i, (text, digit, _) in enumerate(prompts) if text == caption(form, digit)]
        if rows:
            per_form[form] = float(correct[rows].mean())
    return {"num_samples": num_samples, "steps": steps, "accuracy": float(correct.mean()),
            "train_forms": float(correct[~held_out].mean()) if (~held_out).any() else None,
            "held_out_forms": float(correct[held_out].mean()) if held_out.any() else None,
            "per_form": per_form}


def prompt_conditioning(pipe, captions: list[str], max_sequence_length: int = 120) -> dict[str, np.ndarray]:
    """``captions`` encoded by the pipeline's tokenizer and T5 as the pipeline encodes them (its ``encode_prompt``
    with ``clean_caption=False``, the negative prompt "") at ``max_sequence_length``: the arrays of ``run
    --conditioning`` and ``learn --conditioning-data`` by the pipeline's argument names, float32."""
    with torch.no_grad():
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            captions, do_classifier_free_guidance=True, negative_prompt="", device="cpu", clean_caption=False,
            max_sequence_length=max_sequence_length)
    return {"prompt_embeds": embeds.float().numpy(), "prompt_attention_mask": mask.float().numpy(),
            "negative_prompt_embeds": negative.float().numpy(),
            "negative_prompt_attention_mask": negative_mask.float().numpy()}


def write_learning_prompts(out: str | Path, folder: str | Path = T2I_DIR, max_sequence_length: int = 120) -> Path:
    """The prompts the router is learned on (every digit with every training caption form), from the folder's own
    tokenizer and T5 (:func:`prompt_conditioning`), as an .npz."""
    import io

    from ..core.util import atomic_write_bytes

    captions = [caption(form, digit) for form in TRAIN_FORMS for digit in range(10)]
    buffer = io.BytesIO()
    np.savez(buffer, **prompt_conditioning(load_pipeline(folder), captions, max_sequence_length))
    atomic_write_bytes(Path(out), buffer.getvalue())
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The t2i-digits model: its accuracy, its learning prompts.")
    commands = parser.add_subparsers(dest="command", required=True)
    accuracy = commands.add_parser("accuracy", help="What diffusers' pipeline draws, read by the digits classifier.")
    accuracy.add_argument("--folder", type=Path, default=T2I_DIR)
    accuracy.add_argument("--num-samples", type=int, default=500)
    accuracy.add_argument("--steps", type=int, default=SAMPLE_STEPS)
    accuracy.add_argument("--seed", type=int, default=0)
    accuracy.add_argument("--json", type=Path, help="Also write the result here.")
    prompts = commands.add_parser("prompts", help="The router's learning prompts (.npz) from the folder's T5.")
    prompts.add_argument("--folder", type=Path, default=T2I_DIR)
    prompts.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "accuracy":
        result = sample_accuracy(args.folder, args.num_samples, args.steps, args.seed)
        print(json.dumps(result, indent=1))
        if args.json:
            from ..core.util import write_json

            write_json(args.json, result)
    else:
        print(f"wrote {write_learning_prompts(args.out, args.folder)}")


if __name__ == "__main__":  # pragma: no cover
    main()
