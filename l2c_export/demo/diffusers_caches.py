"""Every cache a diffusers user can switch on today, as peers of the learned schedule on a text-to-image folder
(``eval --budgets``, :mod:`l2c_export.demo.curve`), each on diffusers' own ``PixArtAlphaPipeline.from_pretrained``
in PyTorch, as its users run it (a video model's ``WanPipeline`` at the build's clip and prompt length:
:func:`folder_pipelines`):

- cache-dit 1.5.3's DBCache (``cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(...))``), alone and with its
  TaylorSeer calibrator (``calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=1)``);
- diffusers 0.42's hooks, ``transformer.enable_cache(config)`` with ``FirstBlockCacheConfig``,
  ``TaylorSeerCacheConfig``, ``MagCacheConfig`` (its ratios calibrated first, ``calibrate=True``),
  ``FasterCacheConfig`` and ``PyramidAttentionBroadcastConfig``. A transformer class without ``enable_cache``
  (``PixArtTransformer2DModel`` is no ``CacheMixin``) is recorded with the error a user gets; the same hook is then
  applied with the function ``enable_cache`` itself calls (``diffusers.hooks.apply_*``), each pipeline call wrapped
  in the cache context ``enable_cache`` users get from their pipeline (``"cond"``: guidance is one batched call), the
  hook state reset before it, and the current timestep handed to the hooks that ask for it from the transformer's
  own ``timestep`` argument. A hook that still fails says so in its row.

What a method spends is counted from what ran (:class:`SublayerCounter`): forward hooks on the first weighted layer
inside each scheduled sub-layer (``transformer_blocks.i.attn1 / attn2 / ff``), which a cache that serves the
sub-layer from memory never calls, weighted by the rows of the batch it ran on (FasterCache drops the unconditional
half of some calls), times the model's own per-sub-layer MACs; the always-run part (embedders, final layer) by the
rows of the patch embedding. cache-dit's own count (the steps it reports cached) is checked against it.

Each method's knobs are searched on a calibration set (:func:`search`): a grid of settings, measured once and shared
by every budget, then the continuous knob (a threshold) bisected between the two settings that bracket a budget the
grid missed; every setting tried is recorded with its MAC fraction and PSNR against full compute.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..core.macs import MacCount

TOLERANCE = 0.03  # a budget is reached within this MAC fraction
# The always-run input embedding of each transformer family (PixArt, SD3: pos_embed; FLUX.1: x_embedder; Sana:
# patch_embed; Qwen-Image: img_in; Wan: patch_embedding)
PATCH_EMBEDDINGS = ("pos_embed", "x_embedder", "patch_embed", "img_in", "patch_embedding")


class SublayerCounter:
    """Forward hooks that see what a transformer computed: per scheduled sub-layer (``sublayers``, module names) the
    batch rows its first weighted layer ran on, and the rows of the always-run patch embedding."""

    def __init__(self, transformer, sublayers: Sequence[str]):
        modules = dict(transformer.named_modules())
        self.rows = [0] * len(sublayers)
        self.always_rows = 0
        embedding = next((modules[name] for name in PATCH_EMBEDDINGS  # FLUX.1's pos_embed is rotary: no weights
                          if name in modules and any(True for _ in modules[name].parameters())), None)
        if embedding is None:
            raise ValueError(f"{type(transformer).__name__} has none of the patch embeddings {PATCH_EMBEDDINGS}")
        self.handles = [_first_weighted(embedding).register_forward_pre_hook(self._count_always)]
        for index, name in enumerate(sublayers):
            self.handles.append(_first_weighted(modules[name]).register_forward_pre_hook(self._count(index)))

    def _count_always(self, _module, args):
        self.always_rows += int(args[0].shape[0])

    def _count(self, index: int):
        def hook(_module, args):
            self.rows[index] += int(args[0].shape[0])
        return hook

    def reset(self) -> None:
        self.rows = [0] * len(self.rows)
        self.always_rows = 0

    def mac_fraction(self, macs: MacCount, full_rows: int) -> float:
        """MACs spent / MACs of full compute, which runs ``full_rows`` rows through every forward (images x steps x
        2 with guidance)."""
        spent = self.always_rows * macs.always + sum(r * macs.sublayer(j) for j, r in enumerate(self.rows))
        return spent / (full_rows * macs.full)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _first_weighted(module):
    """The first module inside ``module`` (itself included) that holds weights of its own: it runs whenever
    ``module`` computes."""
    return next(m for _, m in module.named_modules() if any(True for _ in m.parameters(recurse=False)))


@dataclass
class PeerPipeline:
    """A pipeline with one peer's cache switched on: ``call(captions, latents)`` returns decoded images (n, C, H, W)
    in [-1, 1]; ``own_counter()`` the method's own report of what it skipped (None where it has none)."""

    pipe: object
    num_steps: int
    cfg_scale: float
    scale_argument: str = "guidance_scale"  # Qwen-Image's: true_cfg_scale
    passes: int = 2  # batch rows per image and step at full compute: 2 with classifier-free guidance, else 1
    call_options: dict = field(default_factory=dict)  # :func:`call_options`
    before_call: Callable[[], None] = lambda: None
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    own_counter: Callable[[], dict | None] = lambda: None
    info: dict = field(default_factory=dict)
    last_images: int = 0
    video: bool = False  # a video pipeline: latents (n, C, F, H, W), clips out

    def call(self, captions: Sequence[str], latents: np.ndarray) -> np.ndarray:
        """``captions`` (n) from ``latents`` (the family's sample layout, n first) through the pipeline, decoded by
        its VAE and post-processed as its ``output_type="pt"`` does, mapped back to [-1, 1]: images (n, C, H, W), or
        a video pipeline's clips (n, C, F, H, W) (its ``frames`` (n, F, C, H, W) in the builds' layout)."""
        import torch

        self.before_call()
        self.last_images = len(captions)
        with torch.no_grad(), self.context():
            output = self.pipe(list(captions), num_inference_steps=self.num_steps,
                               latents=torch.from_numpy(np.ascontiguousarray(latents)), output_type="pt",
                               **{self.scale_argument: self.cfg_scale}, **self.call_options)
        images = output.frames.transpose(1, 2) if hasattr(output, "frames") else output.images
        return (images.float() * 2.0 - 1.0).clamp(-1.0, 1.0).numpy()


@dataclass(frozen=True)
class Peer:
    """A cache as its users switch it on: ``entry`` (what they call), the knob grid (``grid(size)``: "small" or
    "full", a list of knob dicts), ``enable(pipe, knobs, state)`` switching it on, and ``bisect`` the continuous knob
    searched between grid settings (None: grid only)."""

    name: str
    entry: str
    grid: Callable[[str], list[dict]]
    enable: Callable[[PeerPipeline, dict, dict], None]
    bisect: str | None = None
    calibrate: Callable[["PeerPipeline", Sequence[str], np.ndarray, dict], None] | None = None


def _geometric(low: float, high: float, count: int) -> list[float]:
    return [float(f"{v:.4g}") for v in np.geomspace(low, high, count)]


# ---- cache-dit

def _import_cache_dit():
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # it logs every context at info
    import cache_dit

    return cache_dit


def _dbcache_grid(size: str) -> list[dict]:
    structures = ((1, 0, 2),) if size == "small" else ((1, 0, 2), (1, 0, 4), (2, 0, 2))
    thresholds = _geometric(0.05, 0.5, 2) if size == "small" else _geometric(0.02, 2.0, 7)
    return [{"Fn_compute_blocks": fn, "Bn_compute_blocks": bn, "max_warmup_steps": warmup,
             "residual_diff_threshold": t} for fn, bn, warmup in structures for t in thresholds]


def _enable_dbcache(taylorseer: bool):
    def enable(peer: PeerPipeline, knobs: dict, _state: dict) -> None:
        cache_dit = _import_cache_dit()
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        cache_dit.enable_cache(peer.pipe, cache_config=cache_dit.DBCacheConfig(num_inference_steps=peer.num_steps,
                                                                                 **knobs),
                               calibrator_config=calibrator)
        block_list = blocks_path(peer.pipe.transformer)
        blocks = len(peer.pipe.transformer.get_submodule(block_list))
        skipped = [knobs["Fn_compute_blocks"], blocks - knobs["Bn_compute_blocks"]]  # [first, stop) of the skipped
        cached: list[int] = []
        cfg_cached: list[int] = []
        images: list[int] = []

        def own_counter() -> dict:
            """Steps cache-dit says it served from its cache, per counted call so far (and each call's images); where
            the pipeline calls the conditional and unconditional passes apart (Wan; cache-dit's
            ``enable_separate_cfg``), the conditional pass's, and the unconditional's as ``cfg_cached_steps``."""
            stats = cache_dit.summary(peer.pipe.transformer, logging=False)  # of the last call
            cached.append(len(stats[0].cached_steps) if stats else 0)
            config = stats[0].cache_options.get("cache_config") if stats else None
            separate = bool(getattr(config, "enable_separate_cfg", False))
            cfg_cached.append(len(stats[0].cfg_cached_steps) if separate else 0)
            images.append(peer.last_images)
            return {"cached_steps_per_call": list(cached), "images_per_call": list(images), "blocks": blocks,
                    "block_list": block_list, "blocks_skipped_per_cached_step": skipped,
                    **({"cfg_cached_steps_per_call": list(cfg_cached)} if separate else {})}

        peer.own_counter = own_counter
    return enable


def blocks_path(transformer) -> str:
    """The module list of a transformer's blocks that the caches skip: ``transformer_blocks`` (PixArt, SD3, FLUX.1's
    double-stream blocks), or ``blocks`` (Wan)."""
    return "transformer_blocks" if hasattr(transformer, "transformer_blocks") else "blocks"


# ---- diffusers' hooks

def _diffusers_enable(config_name: str, apply_name: str, make: Callable[[dict, dict], dict]):
    """``transformer.enable_cache(Config(**make(knobs, state)))``; where the class has no ``enable_cache``, the hook
    ``diffusers.hooks.<apply_name>`` that it calls, in the cache context its pipelines set."""
    def enable(peer: PeerPipeline, knobs: dict, state: dict) -> None:
        import diffusers
        from diffusers import hooks
        from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

        transformer = peer.pipe.transformer
        timestep = {"value": -1}

        def remember_timestep(_module, args, kwargs):
            value = kwargs.get("timestep", args[2] if len(args) > 2 else None)
            if value is not None:
                timestep["value"] = int(value.reshape(-1)[0]) if hasattr(value, "reshape") else int(value)

        transformer.register_forward_pre_hook(remember_timestep, with_kwargs=True)
        config = getattr(diffusers, config_name)(**make(knobs, {
            **state, "timestep": lambda: timestep["value"], "blocks": blocks_path(transformer),
            "tensor_format": "BCFHW" if peer.video else "BCHW"}))
        try:
            transformer.enable_cache(config)
            peer.info["applied_with"] = f"transformer.enable_cache({config_name}(...))"
        except AttributeError as error:
            peer.info["enable_cache_error"] = f"{type(error).__name__}: {error}"
            getattr(hooks, apply_name)(transformer, config)
            peer.info["applied_with"] = f"diffusers.hooks.{apply_name}(transformer, {config_name}(...))"

            @contextlib.contextmanager
            def context():
                _set_cache_context(transformer, CacheContext("cond"))
                try:
                    yield
                finally:
                    _set_cache_context(transformer, None)

            peer.context = context
        peer.before_call = lambda: HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks()
    return enable


def _fbc_grid(size: str) -> list[dict]:
    return [{"threshold": t} for t in (_geometric(0.05, 0.5, 2) if size == "small" else _geometric(0.01, 2.0, 8))]


def _taylorseer_grid(size: str) -> list[dict]:
    intervals, before = ((2, 5), (2,)) if size == "small" else ((2, 3, 4, 6, 10), (1, 3, 6, 10))
    return [{"cache_interval": i, "disable_cache_before_step": b} for i in intervals for b in before]


def _taylorseer_make(knobs: dict, state: dict) -> dict:
    import torch

    return {**knobs, "max_order": 1, "taylor_factors_dtype": torch.float32,
            "cache_identifiers": [rf"{state['blocks']}\.\d+"]}


def _magcache_grid(size: str) -> list[dict]:
    thresholds = _geometric(0.02, 0.5, 2) if size == "small" else _geometric(0.005, 1.0, 7)
    skips = (3,) if size == "small" else (2, 4, 8)
    return [{"threshold": t, "max_skip_steps": k} for k in skips for t in thresholds]


def _magcache_make(knobs: dict, state: dict) -> dict:
    return {**knobs, "num_inference_steps": state["num_steps"], "mag_ratios": state["mag_ratios"]}


def _magcache_calibrate(peer: PeerPipeline, captions: Sequence[str], latents: np.ndarray, state: dict) -> None:
    """``MagCacheConfig(calibrate=True)`` on the calibration prompts: the ratios it prints become ``mag_ratios``."""
    import ast

    _diffusers_enable("MagCacheConfig", "apply_mag_cache",
                      lambda _k, s: {"calibrate": True, "num_inference_steps": s["num_steps"]})(peer, {}, state)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        peer.call(captions, latents)
    text = printed.getvalue()
    start = text.index("[", text.index("mag_ratios=...):"))
    state["mag_ratios"] = [float(v) for v in ast.literal_eval(text[start: text.index("]", start) + 1])]


def _fastercache_grid(size: str) -> list[dict]:
    skips, highs, uncond = ((2,), (1000,), (5,)) if size == "small" else ((2, 3, 4), (681, 1000), (5, 2))
    return [{"spatial_attention_block_skip_range": s, "spatial_attention_timestep_skip_range": (-1, h),
             "unconditional_batch_skip_range": u, "unconditional_batch_timestep_skip_range": (-1, h)}
            for s in skips for h in highs for u in uncond]


def _fastercache_make(knobs: dict, state: dict) -> dict:
    return {**knobs, "current_timestep_callback": state["timestep"], "tensor_format": state["tensor_format"]}


def _pab_grid(size: str) -> list[dict]:
    spatial, cross, ranges = (((3,), (2,), ((-1, 1000),)) if size == "small"
                              else ((2, 3, 4), (None, 2, 6), ((100, 800), (-1, 1000))))
    return [{"spatial_attention_block_skip_range": s, "cross_attention_block_skip_range": c,
             "spatial_attention_timestep_skip_range": r, "cross_attention_timestep_skip_range": r}
            for s in spatial for c in cross for r in ranges]


def _pab_make(knobs: dict, state: dict) -> dict:
    return {**knobs, "current_timestep_callback": state["timestep"]}


PEERS: dict[str, Peer] = {peer.name: peer for peer in (
    Peer("cache-dit", "cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(...))", _dbcache_grid,
         _enable_dbcache(False), bisect="residual_diff_threshold"),
    Peer("cache-dit+taylorseer", "cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(...), "
         "calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=1))", _dbcache_grid,
         _enable_dbcache(True), bisect="residual_diff_threshold"),
    Peer("diffusers-fbc", "transformer.enable_cache(FirstBlockCacheConfig(...))", _fbc_grid,
         _diffusers_enable("FirstBlockCacheConfig", "apply_first_block_cache", lambda k, _s: dict(k)),
         bisect="threshold"),
    # its default identifiers ("^transformer_blocks.*attn", fully matched) hook nothing in PixArt (attn1, attn2): the
    # whole blocks are named instead (Wan's: blocks.i)
    Peer("diffusers-taylorseer", "transformer.enable_cache(TaylorSeerCacheConfig(..., max_order=1, "
         "cache_identifiers=[r'transformer_blocks\\.\\d+']))", _taylorseer_grid,
         _diffusers_enable("TaylorSeerCacheConfig", "apply_taylorseer_cache", _taylorseer_make)),
    Peer("diffusers-magcache", "transformer.enable_cache(MagCacheConfig(...)), mag_ratios from calibrate=True",
         _magcache_grid, _diffusers_enable("MagCacheConfig", "apply_mag_cache", _magcache_make), bisect="threshold",
         calibrate=_magcache_calibrate),
    Peer("diffusers-fastercache", "transformer.enable_cache(FasterCacheConfig(...))", _fastercache_grid,
         _diffusers_enable("FasterCacheConfig", "apply_faster_cache", _fastercache_make)),
    Peer("diffusers-pab", "transformer.enable_cache(PyramidAttentionBroadcastConfig(...))", _pab_grid,
         _diffusers_enable("PyramidAttentionBroadcastConfig", "apply_pyramid_attention_broadcast", _pab_make)),
)}


@dataclass
class PeerRun:
    """One peer setting drawn: images (n, C, H, W), the MAC fraction counted by :class:`SublayerCounter`, the
    method's own counter, the pipeline (kept for timing), how the cache was switched on and the wall-clock seconds of
    the calls (counting hooks on)."""

    images: np.ndarray
    mac_fraction: float
    own: dict | None
    peer: PeerPipeline
    info: dict
    seconds: float = 0.0


class FolderPipelines:
    """diffusers' own pipeline of a folder (``DiffusionPipeline.from_pretrained(folder)``, the components saved as
    null left out), as its users load it, called as :class:`PeerPipeline` calls it: each :meth:`open` loads a fresh
    transformer and scheduler (a cache's hooks stay on its transformer), the text encoders, tokenizers and VAE are
    loaded once and shared. ``image_size``: (height, width) in pixels, ``num_frames`` (a video pipeline's clip) and
    ``max_sequence_length`` (the build's prompt length), passed to pipelines that take them."""

    def __init__(self, folder, num_steps: int, cfg_scale: float, scale_argument: str = "guidance_scale",
                 image_size: tuple[int, int] | None = None, passes: int = 2, num_frames: int | None = None,
                 max_sequence_length: int | None = None):
        self.folder, self.num_steps, self.cfg_scale = folder, num_steps, cfg_scale
        self.scale_argument, self.image_size, self.passes = scale_argument, image_size, passes
        self.num_frames, self.max_sequence_length = num_frames, max_sequence_length
        self.shared: dict | None = None
        self.pipeline_class = "pipeline"  # its class name, once loaded

    def load(self):
        import json
        from pathlib import Path

        from diffusers import DiffusionPipeline

        index = json.loads((Path(self.folder) / "model_index.json").read_text())
        absent = {name: None for name, entry in index.items() if isinstance(entry, list) and entry[0] is None}
        pipe = DiffusionPipeline.from_pretrained(str(self.folder), **{**absent, **(self.shared or {})})
        if self.shared is None:
            self.shared = {name: module for name, module in pipe.components.items()
                           if module is not None and name not in ("transformer", "scheduler")}
        pipe.set_progress_bar_config(disable=True)
        self.pipeline_class = type(pipe).__name__
        return pipe

    def open(self, peer: "Peer | None", knobs: dict, state: dict) -> PeerPipeline:
        """A fresh pipeline with ``peer`` switched on at ``knobs`` (None: no cache, full compute). Raises what
        switching it on raises."""
        pipe = self.load()
        pipeline = PeerPipeline(pipe, self.num_steps, self.cfg_scale, self.scale_argument, self.passes,
                                call_options(pipe, self.image_size, self.num_frames, self.max_sequence_length),
                                video=self.num_frames is not None)
        if peer is not None:
            peer.enable(pipeline, knobs, {"num_steps": self.num_steps, **state})
        return pipeline


def folder_pipelines(spec, num_steps: int, cfg_scale: float,
                     image_size: tuple[int, int] | None = None) -> FolderPipelines:
    """:class:`FolderPipelines` of the folder of ``spec`` (a diffusers folder's :class:`l2c_export.models.zoo.ModelSpec`)
    as its builds sample: two passes a step where it guides; ``image_size`` (pixels) where given, and a video model's
    clip as ``WanPipeline`` sizes its latents (F' latent frames: (F' - 1) x the VAE's ``scale_factor_temporal`` + 1
    frames; H' x W' latents: times its ``scale_factor_spatial``) at the build's ``max_sequence_length``."""
    import json
    from pathlib import Path

    from ..core.interface import NCFHW

    family, folder = spec.family, Path(spec.weights).parent
    num_frames = max_sequence_length = None
    if family.latent_layout == NCFHW:
        vae_config = folder / "vae" / "config.json"
        vae = json.loads(vae_config.read_text()) if vae_config.is_file() else {}
        frames, height, width = family.latent_shape(spec.config)
        spatial = vae.get("scale_factor_spatial", 8)
        num_frames = (frames - 1) * vae.get("scale_factor_temporal", 4) + 1
        image_size, max_sequence_length = (height * spatial, width * spatial), spec.max_sequence_length
    return FolderPipelines(folder, num_steps, cfg_scale, family.scale_argument, image_size=image_size,
                           passes=2 if family.classifier_free and cfg_scale > 1.0 else 1, num_frames=num_frames,
                           max_sequence_length=max_sequence_length)


def call_options(pipe, image_size: tuple[int, int] | None, num_frames: int | None = None,
                 max_sequence_length: int | None = None) -> dict:
    """What a pipeline is called with besides the prompts, latents, steps and scale, where its ``__call__`` takes
    them: the negative prompt "" (the builds' negative), no caption cleaning and no resolution binning (PixArt,
    Sana: the builds' preprocessing and size), the image's height and width in pixels (a packed-latent pipeline
    unpacks by them), a clip's frames and the prompt length (Wan: its cross-attention reads every padded row)."""
    import inspect

    accepted = inspect.signature(pipe.__call__).parameters
    wanted = {"negative_prompt": "", "clean_caption": False, "use_resolution_binning": False}
    if image_size is not None:
        wanted.update(height=image_size[0], width=image_size[1])
    if num_frames is not None:
        wanted.update(num_frames=num_frames)
    if max_sequence_length is not None:
        wanted.update(max_sequence_length=max_sequence_length)
    return {name: value for name, value in wanted.items() if name in accepted}


def draw(pipeline: PeerPipeline, captions: Sequence[str], noise: np.ndarray, macs: MacCount,
         sublayers: Sequence[str], batch_size: int) -> PeerRun:
    """``captions`` (n) from ``noise`` (n, C, h, w), ``batch_size`` a call, counted (the interleaved timings of
    ``eval --budgets`` are :func:`time_call`'s)."""
    counter = SublayerCounter(pipeline.pipe.transformer, sublayers)
    images, own, seconds = [], None, 0.0
    try:
        for start in range(0, len(captions), batch_size):
            stop = min(start + batch_size, len(captions))
            begin = time.perf_counter()
            images.append(pipeline.call(captions[start:stop], noise[start:stop]))
            seconds += time.perf_counter() - begin
            own = pipeline.own_counter()
        fraction = counter.mac_fraction(macs, len(captions) * pipeline.num_steps * pipeline.passes)
    finally:
        counter.remove()
    return PeerRun(np.concatenate(images), fraction, own, pipeline, dict(pipeline.info), seconds)


def own_mac_fraction(own: dict, macs: MacCount, sublayers: Sequence[str], num_steps: int) -> float | None:
    """cache-dit's own count as a MAC fraction: every cached step of a call skips the blocks
    ``blocks_skipped_per_cached_step`` ([first, stop) of ``block_list``: ``transformer_blocks``, Wan's ``blocks``)
    for each of its images, in every pass of the step (where the passes are called apart,
    ``cfg_cached_steps_per_call``: each pass's cached steps skip that pass, half the step); a block's MACs are those
    of its scheduled ``sublayers``. None where the sub-layers are not all in that list (FLUX.1's single blocks:
    cache-dit's count covers another list)."""
    prefix = own.get("block_list", "transformer_blocks") + "."
    if not all(name.startswith(prefix) for name in sublayers):
        return None
    first, stop = own["blocks_skipped_per_cached_step"]
    per_step = sum(macs.sublayer(j) for j, name in enumerate(sublayers)
                   if first <= int(name.split(".")[1]) < stop)
    images = own["images_per_call"]
    cached = own["cached_steps_per_call"]
    if "cfg_cached_steps_per_call" in own:
        cached = [(c + u) / 2 for c, u in zip(cached, own["cfg_cached_steps_per_call"])]
    skipped = sum(c * n for c, n in zip(cached, images))
    return 1.0 - skipped * per_step / (sum(images) * num_steps * macs.full)


def time_call(pipeline: PeerPipeline, captions: Sequence[str], noise: np.ndarray) -> float:
    """Wall-clock seconds of one pipeline call (text encoder, sampling and VAE decoding)."""
    begin = time.perf_counter()
    pipeline.call(captions, noise)
    return time.perf_counter() - begin


def search(peer: Peer, budgets: Sequence[float], measure: Callable[[dict], tuple[float, float]], size: str,
           refine: int = 3) -> list[dict]:
    """Every setting tried: the grid of ``peer`` (``size``), then, per budget no setting reached within
    :data:`TOLERANCE`, ``peer.bisect`` bisected (geometrically, up to ``refine`` times) between the two settings of
    the same other knobs whose MAC fractions bracket it. ``measure(knobs)`` -> (MAC fraction, PSNR)."""
    tried = []

    def run(knobs: dict) -> dict:
        fraction, quality = measure(knobs)
        tried.append({"settings": knobs, "mac_fraction": fraction, "psnr": quality})
        return tried[-1]

    for knobs in peer.grid(size):
        run(knobs)
    if peer.bisect is None:
        return tried
    for budget in budgets:
        if any(abs(t["mac_fraction"] - budget) <= TOLERANCE for t in tried):
            continue
        bracket = _bracket(tried, budget, peer.bisect)
        for _ in range(refine if bracket else 0):
            above, below = bracket  # above: computes more than the budget
            middle = math.sqrt(above["settings"][peer.bisect] * below["settings"][peer.bisect])
            entry = run({**above["settings"], peer.bisect: float(f"{middle:.4g}")})
            if abs(entry["mac_fraction"] - budget) <= TOLERANCE:
                break
            bracket = (entry, below) if entry["mac_fraction"] > budget else (above, entry)
    return tried


def _bracket(tried: list[dict], budget: float, knob: str):
    """The closest pair (same knobs but ``knob``) around ``budget``: (computes more, computes less)."""
    best = None
    for above in tried:
        for below in tried:
            same = {k: v for k, v in above["settings"].items() if k != knob} == \
                   {k: v for k, v in below["settings"].items() if k != knob}
            if same and above["mac_fraction"] > budget > below["mac_fraction"]:
                gap = above["mac_fraction"] - below["mac_fraction"]
                if best is None or gap < best[0]:
                    best = (gap, above, below)
    return None if best is None else best[1:]


def choose(tried: list[dict], budget: float) -> tuple[dict, bool]:
    """The setting for ``budget``: of those within :data:`TOLERANCE` the best PSNR (the peer's best shot), else the
    nearest; and whether it is within."""
    close = [t for t in tried if abs(t["mac_fraction"] - budget) <= TOLERANCE]
    if close:
        return max(close, key=lambda t: -np.inf if t["psnr"] is None else t["psnr"]), True
    return min(tried, key=lambda t: abs(t["mac_fraction"] - budget)), False
