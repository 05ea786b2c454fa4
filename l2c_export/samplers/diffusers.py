"""diffusers' schedulers as samplers: ``DDIMScheduler``, ``DPMSolverMultistepScheduler`` (DPM-Solver++ 1S/2M) and
``FlowMatchEulerDiscreteScheduler`` (flow matching: SD3/3.5, FLUX.1), read from a pipeline folder's
``scheduler/scheduler_config.json`` (``UniPCMultistepScheduler`` builds on these in :mod:`.unipc`; :mod:`.schedulers`
picks the sampler of a config).

Hand-written in numpy on purpose: diffusers' schedulers are torch code, and the samplers here run where torch is not
(the runtime, the Triton model, the C++ runtime, which reads the same manifest tables). They reproduce diffusers 0.42's
``set_timesteps`` and ``step`` as its pipelines (``DiTPipeline``, ``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``)
run them: ``eta = 0``, ``scale_model_input`` the identity, the model given the integer timestep, one model call per
step; flow matching as ``StableDiffusion3Pipeline``, ``FluxPipeline`` and ``QwenImagePipeline`` set its timesteps (:class:`PipelineTimesteps`). Like diffusers, the tables are float32 (betas from a float64 linspace rounded to float32, ``alphas_cumprod`` a
product accumulated in float64 and rounded per entry, as torch's CPU ``cumprod`` does) and every scalar coefficient of
a step is formed in float32 operation by operation; on float32 samples the step then matches diffusers' own to float32
rounding. (torch's float32 ``linspace`` rounds some betas one float32 ulp differently, depending on the CPU's vector
width; the effect on a sample is below 1e-7 of its range.)

An option is either implemented exactly or refused by name (:class:`SchedulerConfigError`, one line naming the file,
the field and what is supported); keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are housekeeping
and ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from ..core.util import read_folder_json, short_repr
from ..core.vocabulary import dit_official_calls
from .base import CallGenerator, ModelCall
from .gaussian import GaussianSampler, _clip


class SchedulerConfigError(ValueError):
    """A scheduler config (or a manifest's sampler section) this module cannot run exactly; the message names the
    file and the field."""


# ---------------------------------------------------------------------------------------------------------------------
# Options: each one a default and a check; anything else is refused.

Check = Callable[[object], str | None]  # the value -> None when accepted, else what is supported


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(*supported) -> Check:
    return lambda value: None if any(value == s and type(value) is type(s) for s in supported) else \
        "supported: " + ", ".join(repr(s) for s in supported)


def _boolean(value) -> str | None:
    return None if isinstance(value, bool) else "expected true or false"


def _integer(low: int, high: int) -> Check:
    return lambda value: None if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high \
        else f"expected an integer in {low}..{high}"


def _number(low: float, high: float, low_open: bool = False) -> Check:
    def check(value):
        ok = _is_number(value) and (low < value if low_open else low <= value) and value <= high
        return None if ok else f"expected a finite number in {'(' if low_open else '['}{low}, {high}]"
    return check


def _positive(value) -> str | None:
    return None if _is_number(value) and value > 0 else "expected a finite number > 0"


def _trained_betas(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, list) and value and all(_is_number(b) and 0 < b < 1 for b in value):
        return None
    return "expected null or a non-empty list of finite numbers in (0, 1)"


def _lambda_min_clipped(value) -> str | None:
    # diffusers' default is -inf (written -Infinity in its JSON; null here, as strict JSON has no infinities).
    if value is None or value == -math.inf or _is_number(value):
        return None
    return "expected -Infinity or null (no clipping) or a finite number"


_BETAS_OPTIONS: dict[str, tuple[object, Check]] = {
    # The manifest's timesteps are 0..999 (its schema), hence at most 1000 training timesteps.
    "num_train_timesteps": (1000, _integer(2, 1000)),
    "beta_start": (0.0001, _number(0.0, 1.0, low_open=True)),
    "beta_end": (0.02, _number(0.0, 1.0, low_open=True)),
    "beta_schedule": ("linear", _choice("linear", "scaled_linear", "squaredcos_cap_v2")),
    "trained_betas": (None, _trained_betas),
    "rescale_betas_zero_snr": (False, _choice(False)),
    "thresholding": (False, _choice(False)),
    "dynamic_thresholding_ratio": (0.995, _number(0.0, 1.0, low_open=True)),  # read only with thresholding
    "sample_max_value": (1.0, _positive),  # read only with thresholding
    "steps_offset": (0, _integer(0, 999)),
}

DDIM_OPTIONS: dict[str, tuple[object, Check]] = {
    **_BETAS_OPTIONS,
    "clip_sample": (True, _boolean),
    "clip_sample_range": (1.0, _positive),
    "set_alpha_to_one": (True, _boolean),
    "prediction_type": ("epsilon", _choice("epsilon", "sample", "v_prediction")),
    "timestep_spacing": ("leading", _choice("linspace", "leading", "trailing")),
}

DPM_MULTISTEP_OPTIONS: dict[str, tuple[object, Check]] = {
    **_BETAS_OPTIONS,
    "solver_order": (2, _choice(1, 2)),
    # flow_prediction (the velocity) goes with use_flow_sigmas and the other three without (check_flow_options)
    "prediction_type": ("epsilon", _choice("epsilon", "sample", "v_prediction", "flow_prediction")),
    "algorithm_type": ("dpmsolver++", _choice("dpmsolver++")),
    "solver_type": ("midpoint", _choice("midpoint", "heun")),
    "lower_order_final": (True, _boolean),
    "euler_at_final": (False, _boolean),
    "use_karras_sigmas": (False, _boolean),
    "use_exponential_sigmas": (False, _choice(False)),
    "use_beta_sigmas": (False, _choice(False)),
    "use_lu_lambdas": (False, _choice(False)),
    "use_flow_sigmas": (False, _boolean),  # Sana's: sigmas 1 - t shifted by flow_shift, alpha_t = 1 - sigma
    "flow_shift": (1.0, _positive),  # read only with flow sigmas
    "final_sigmas_type": ("zero", _choice("zero", "sigma_min")),
    "lambda_min_clipped": (None, _lambda_min_clipped),
    "variance_type": (None, _choice(None)),  # the pipelines split the learned sigma off themselves
    "timestep_spacing": ("linspace", _choice("linspace", "leading", "trailing")),
    "use_dynamic_shifting": (False, _choice(False)),
    "time_shift_type": ("exponential", _choice("exponential")),
}


def check_options(specs: dict[str, tuple[object, Check]], config: dict, where: str, class_name: str,
                  prefix: str = "") -> dict:
    """The options of ``config`` with the defaults of the others, every value checked; keys starting with ``_`` are
    ignored. Raises :class:`SchedulerConfigError` naming ``where`` and the first unknown or unsupported field."""
    if not isinstance(config, dict):
        raise SchedulerConfigError(f"{where}: expected a JSON object of {class_name} options; got "
                                   f"{type(config).__name__}")
    unknown = sorted(key for key in config if not str(key).startswith("_") and key not in specs)
    if unknown:
        raise SchedulerConfigError(f"{where}: field '{prefix}{short_repr(unknown[0])[1:-1]}' is not a {class_name} "
                                   f"option that l2c-export implements; expected only: {', '.join(specs)}")
    options = {}
    for name, (default, check) in specs.items():
        value = config.get(name, default)
        problem = check(value)
        if problem is not None:
            raise SchedulerConfigError(f"{where}: field '{prefix}{name}' is {short_repr(value)}; {problem}")
        options[name] = value
    if options.get("lambda_min_clipped") == -math.inf:
        options["lambda_min_clipped"] = None
    betas = options.get("trained_betas")
    if betas is not None and len(betas) != options["num_train_timesteps"]:
        raise SchedulerConfigError(f"{where}: field '{prefix}trained_betas' has {len(betas)} entries; expected "
                                   f"num_train_timesteps = {options['num_train_timesteps']}")
    return options


# ---------------------------------------------------------------------------------------------------------------------
# The tables diffusers builds in __init__ and set_timesteps.

def _alpha_bar_cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``betas_for_alpha_bar`` (cosine): float64 Python arithmetic, then float32."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float32)


def alphas_cumprod_of(options: dict) -> np.ndarray:
    """(num_train_timesteps,) float32: the scheduler's ``alphas_cumprod``."""
    count = options["num_train_timesteps"]
    if options["trained_betas"] is not None:
        betas = np.asarray(options["trained_betas"], dtype=np.float32)
    elif options["beta_schedule"] == "linear":
        betas = np.linspace(options["beta_start"], options["beta_end"], count).astype(np.float32)
    elif options["beta_schedule"] == "scaled_linear":
        roots = np.linspace(options["beta_start"] ** 0.5, options["beta_end"] ** 0.5, count).astype(np.float32)
        betas = roots * roots
    else:
        betas = _alpha_bar_cosine_betas(count)
    alphas = np.float32(1.0) - betas
    # torch's CPU cumprod accumulates float32 in float64 and rounds each entry.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _spaced_timesteps(spacing: str, num_train: int, num_steps: int, steps_offset: int, last_timestep: int,
                      dpm: bool) -> np.ndarray:
    """``set_timesteps``' spacing, descending int64. DDIM spaces ``num_steps`` points; DPM-Solver ``num_steps + 1``
    and drops the last, and stops at ``last_timestep`` (``lambda_min_clipped``)."""
    if spacing == "linspace":
        if dpm:
            return np.linspace(0, last_timestep - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        return np.linspace(0, num_train - 1, num_steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        if dpm:
            ratio = last_timestep // (num_steps + 1)
            kept = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        else:
            ratio = num_train // num_steps
            kept = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64)
        return kept + steps_offset
    ratio = num_train / num_steps
    return np.round(np.arange(last_timestep if dpm else num_train, 0, -ratio)).astype(np.int64) - 1


def _karras_sigmas(sigmas: np.ndarray, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' ``_convert_to_karras`` (rho 7) over the float32 training sigmas, and ``_sigma_to_t`` of each:
    (sigmas float64 (num_steps,), timesteps float64 (num_steps,)), as DPMSolverMultistepScheduler computes them."""
    log_sigmas = np.log(sigmas)
    ascending = np.flip(sigmas).copy()
    sigma_min, sigma_max = ascending[-1].item(), ascending[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    karras = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    times = []
    for sigma in karras:
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
        times.append(((1 - w) * low_idx + w * (low_idx + 1)).reshape(np.shape(sigma)))
    return karras, np.array(times)


def _check_num_steps(num_inference_steps, options: dict, where: str) -> None:
    count = options["num_train_timesteps"]
    if not (isinstance(num_inference_steps, int) and not isinstance(num_inference_steps, bool)
            and 1 <= num_inference_steps <= count):
        raise SchedulerConfigError(f"{where}: num_inference_steps (--steps) is {num_inference_steps!r}; expected an "
                                   f"integer in 1..{count} (num_train_timesteps)")


def check_first_timestep_once(timesteps: np.ndarray, options: dict, num_inference_steps: int, where: str) -> None:
    """diffusers' multistep schedulers start at the second occurrence of a repeated first timestep
    (``index_for_timestep``) and then run past their sigmas: refused."""
    if (timesteps[0] == timesteps[1:]).any():
        raise SchedulerConfigError(f"{where}: {num_inference_steps} steps with timestep_spacing "
                                   f"{options['timestep_spacing']!r} repeat the first timestep "
                                   f"{int(timesteps[0])}; choose fewer steps")


def _check_timestep_range(timesteps: np.ndarray, options: dict, num_inference_steps: int, where: str) -> None:
    """diffusers indexes its tables with these: each must lie in 0..num_train_timesteps - 1 (``steps_offset`` can push
    leading spacing past the end; trailing spacing's float ``arange`` gives an extra timestep -1 for some counts)."""
    count = options["num_train_timesteps"]
    outside = [int(t) for t in timesteps if not 0 <= t < count]
    if len(timesteps) == 0 or outside:
        raise SchedulerConfigError(f"{where}: timestep_spacing {options['timestep_spacing']!r} with steps_offset "
                                   f"{options['steps_offset']} and {num_inference_steps} steps gives timestep(s) "
                                   f"{outside or 'none'}, outside 0..{count - 1}; choose another step count or "
                                   f"spacing")


# ---------------------------------------------------------------------------------------------------------------------
# Manifest tables: read back with every value checked.

def _table(data: dict, name: str, length: int, low: float | None = None, high: float | None = None,
           low_open: bool = False, integer: bool = False) -> np.ndarray:
    """``data[name]`` as a float64 (or int64) array of ``length`` finite numbers in range; else one line naming the
    field ``sampler/name``."""
    at = f"sampler: field '{name}'"
    values = data.get(name)
    if not isinstance(values, list):
        raise SchedulerConfigError(f"{at} is {type(values).__name__}; expected a list of {length} numbers")
    if len(values) != length:
        raise SchedulerConfigError(f"{at} has {len(values)} entries; expected {length}")
    for position, value in enumerate(values):
        fits = _is_number(value) and (not integer or float(value).is_integer()) and \
            (low is None or (low < value if low_open else low <= value)) and (high is None or value <= high)
        if not fits:
            bounds = f"{'(' if low_open else '['}{low}, {high}]" if low is not None else "(any)"
            raise SchedulerConfigError(f"{at} entry {position} is {value!r}; expected a finite "
                                       f"{'integer' if integer else 'number'} in {bounds}")
    return np.asarray(values, dtype=np.int64 if integer else np.float64)


def _section_header(data: dict, kind: str, specs: dict, class_name: str) -> tuple[dict, int, np.ndarray]:
    """The checked (options, num_inference_steps, timesteps (num_calls,)) of a manifest sampler section of ``kind``."""
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise SchedulerConfigError(f"sampler: field 'kind' is {data.get('kind') if isinstance(data, dict) else None!r}"
                                   f"; expected {kind!r}")
    options = check_options(specs, data.get("options"), "sampler", class_name, prefix="options/")
    num_calls = data.get("num_calls")
    if not (isinstance(num_calls, int) and not isinstance(num_calls, bool) and num_calls >= 1):
        raise SchedulerConfigError(f"sampler: field 'num_calls' is {num_calls!r}; expected an integer >= 1")
    steps = data.get("num_inference_steps")
    if not (isinstance(steps, int) and not isinstance(steps, bool)
            and 1 <= steps <= options["num_train_timesteps"]):
        raise SchedulerConfigError(f"sampler: field 'num_inference_steps' is {steps!r}; expected an integer in "
                                   f"1..{options['num_train_timesteps']}")
    model_times = _table(data, "model_times", num_calls, 0, options["num_train_timesteps"] - 1)
    timesteps = _table(data, "timesteps", num_calls, 0, options["num_train_timesteps"] - 1, integer=True)
    if not np.array_equal(model_times, timesteps.astype(np.float64)):
        raise SchedulerConfigError("sampler: field 'model_times' differs from 'timesteps'; the model sees the "
                                   "scheduler's timestep")
    return options, steps, timesteps


class _DiffusersSampler:
    """What both schedulers share: one model call per step at ``timesteps`` (descending int64, (num_calls,))."""

    kind: ClassVar[str]
    class_name: ClassVar[str]
    calls_per_step: ClassVar[int] = 1
    options: dict
    num_inference_steps: int
    timesteps: np.ndarray

    @property
    def num_calls(self) -> int:
        """Model calls (NFE): one per timestep (``len(scheduler.timesteps)``, which is ``num_inference_steps``
        except where trailing spacing or ``lambda_min_clipped`` makes diffusers keep another count)."""
        return len(self.timesteps)

    @property
    def num_steps(self) -> int:
        return self.num_calls

    @property
    def model_times(self) -> np.ndarray:
        """(num_calls,) float64: the integer timestep the pipeline gives the transformer at each call."""
        return self.timesteps.astype(np.float64)

    def official_cache_calls(self) -> list[int]:
        return self.official_calls(self.num_calls)

    # diffusers models come with no authors' router; the official mode uses the DDIM rule's analogue (every other
    # call after the first, as the authors' DiT sampler consults its router)
    official_calls = staticmethod(dit_official_calls)

    def _header(self) -> dict:
        return {"kind": self.kind, "num_calls": self.num_calls, "model_times": self.model_times.tolist(),
                "num_steps": self.num_steps, "num_inference_steps": self.num_inference_steps,
                "options": dict(self.options), "timesteps": self.timesteps.tolist()}

    @staticmethod
    def _output(x, model_output):
        """The scheduler's model output: a learned-sigma output (twice the channels of ``x``) is cut to its first
        half, as DiTPipeline and the PixArt pipelines do before ``step``."""
        channels = x.shape[1]
        return model_output[:, :channels] if model_output.shape[1] == 2 * channels else model_output


# ---------------------------------------------------------------------------------------------------------------------
# DDIMScheduler

class DiffusersDDIM(_DiffusersSampler):
    """diffusers' ``DDIMScheduler.step`` with ``eta = 0``, as the pipelines call it.

    Per step ``s`` (float32 values, (num_calls,)): ``alphas_cumprod[s]`` at the step's timestep and
    ``alphas_cumprod_prev[s]`` at ``timestep - num_train_timesteps // num_inference_steps`` (diffusers' rule for
    every spacing), or the final alpha (1, or ``alphas_cumprod[0]`` without ``set_alpha_to_one``) below 0.
    """

    kind = "diffusers_ddim"
    class_name = "DDIMScheduler"

    def __init__(self, options: dict, num_inference_steps: int, timesteps: np.ndarray, alphas_cumprod: np.ndarray,
                 alphas_cumprod_prev: np.ndarray):
        self.options = options
        self.num_inference_steps = num_inference_steps
        self.timesteps = np.asarray(timesteps, dtype=np.int64)
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float32).astype(np.float64)
        self.alphas_cumprod_prev = np.asarray(alphas_cumprod_prev, dtype=np.float32).astype(np.float64)
        # The step's scalars, formed in float32 as diffusers forms them from its float32 tables.
        alpha = self.alphas_cumprod.astype(np.float32)
        alpha_prev = self.alphas_cumprod_prev.astype(np.float32)
        self._sqrt_alpha = np.sqrt(alpha)
        self._sqrt_beta = np.sqrt(np.float32(1.0) - alpha)
        self._sqrt_alpha_prev = np.sqrt(alpha_prev)
        self._sqrt_beta_prev = np.sqrt(np.float32(1.0) - alpha_prev)

    @classmethod
    def from_scheduler_config(cls, config: dict, num_inference_steps: int, source: str) -> "DiffusersDDIM":
        options = check_options(DDIM_OPTIONS, config, source, cls.class_name)
        _check_num_steps(num_inference_steps, options, source)
        count = options["num_train_timesteps"]
        timesteps = _spaced_timesteps(options["timestep_spacing"], count, num_inference_steps,
                                      options["steps_offset"], count, dpm=False)
        _check_timestep_range(timesteps, options, num_inference_steps, source)
        table = alphas_cumprod_of(options)
        final = np.float32(1.0) if options["set_alpha_to_one"] else table[0]
        previous = timesteps - count // num_inference_steps
        alpha_prev = np.where(previous >= 0, table[np.maximum(previous, 0)], final)
        return cls(options, num_inference_steps, timesteps, table[timesteps], alpha_prev)

    @classmethod
    def create(cls, kind: str, num_calls: int, clip_denoised: bool = False) -> "DiffusersDDIM":
        """diffusers' default DDIMScheduler config with ``clip_sample = clip_denoised``."""
        return cls.from_scheduler_config({"clip_sample": clip_denoised}, num_calls, f"{cls.class_name} defaults")

    def step(self, s: int, x, model_output):
        """``DDIMScheduler.step(model_output, timesteps[s], x).prev_sample``; x, model_output: (n, C, H, W)."""
        sqrt_alpha, sqrt_beta = float(self._sqrt_alpha[s]), float(self._sqrt_beta[s])
        prediction = self.options["prediction_type"]
        if prediction == "epsilon":
            x0 = (x - sqrt_beta * model_output) / sqrt_alpha
            eps = model_output
        elif prediction == "sample":
            x0 = model_output
            eps = (x - sqrt_alpha * x0) / sqrt_beta
        else:  # v_prediction
            x0 = sqrt_alpha * x - sqrt_beta * model_output
            eps = sqrt_alpha * model_output + sqrt_beta * x
        if self.options["clip_sample"]:
            limit = float(self.options["clip_sample_range"])
            x0 = _clip(x0, -limit, limit)
        return float(self._sqrt_alpha_prev[s]) * x0 + float(self._sqrt_beta_prev[s]) * eps

    def calls(self, x, noise=None, first_step: int = 0) -> CallGenerator:
        """Yields one call per step (``x`` as the pipeline feeds the transformer, ``t`` its timestep), receives the
        model output (guided; learned sigma split off or not), returns the latents as ``output_type="latent"``.
        ``noise`` is unused (eta 0)."""
        for s in range(first_step, self.num_calls):
            out = yield ModelCall(s, x, float(self.timesteps[s]))
            x = self.step(s, x, self._output(x, out))
        return x

    def noise_level(self, call: int) -> tuple[float, float]:
        alpha_bar = float(self.alphas_cumprod[call])
        return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)

    def to_dict(self) -> dict:
        return {**self._header(), "alphas_cumprod": self.alphas_cumprod.tolist(),
                "alphas_cumprod_prev": self.alphas_cumprod_prev.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "DiffusersDDIM":
        options, steps, timesteps = _section_header(data, cls.kind, DDIM_OPTIONS, cls.class_name)
        return cls(options, steps, timesteps, _table(data, "alphas_cumprod", len(timesteps), 0.0, 1.0, low_open=True),
                   _table(data, "alphas_cumprod_prev", len(timesteps), 0.0, 1.0, low_open=True))


# ---------------------------------------------------------------------------------------------------------------------
# DPMSolverMultistepScheduler

def _alpha_sigma(sigma: np.float32, flow: bool = False) -> tuple[np.float32, np.float32]:
    """``_sigma_to_alpha_sigma_t`` in float32: alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha; with flow
    sigmas (``flow``) alpha = 1 - sigma, sigma_t = sigma."""
    if flow:
        return np.float32(1.0) - sigma, sigma
    alpha = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0))
    return alpha, sigma * alpha


def _check_flow_options(options: dict, where: str, prefix: str = "") -> None:
    """Flow sigmas come with the velocity (``flow_prediction``) as Sana's folders ship them, and the velocity with
    them only; Karras sigmas would replace the flow sigmas in diffusers (its first branch) while the step still
    takes alpha_t = 1 - sigma. Raises :class:`SchedulerConfigError` naming the field."""
    flow, velocity = options["use_flow_sigmas"], options["prediction_type"] == "flow_prediction"
    if velocity and not flow:
        raise SchedulerConfigError(f"{where}: field '{prefix}prediction_type' is 'flow_prediction' with "
                                   f"use_flow_sigmas false; supported with use_flow_sigmas true only")
    if flow and not velocity:
        raise SchedulerConfigError(f"{where}: field '{prefix}use_flow_sigmas' is true with prediction_type "
                                   f"{options['prediction_type']!r}; supported with prediction_type "
                                   f"'flow_prediction' only")
    if flow and options["use_karras_sigmas"]:
        raise SchedulerConfigError(f"{where}: field '{prefix}use_karras_sigmas' is true with use_flow_sigmas; "
                                   f"supported: one of the two")


def _log32(value: np.float32) -> np.float32:
    """float32 log, correctly rounded as glibc's ``logf`` (torch's on a 0-d tensor) is, not numpy's SIMD one, which
    differs in the last bit for about one value in ten; -inf at 0."""
    with np.errstate(divide="ignore"):
        return np.float32(np.log(np.float64(value)))


def _exp32(value: np.float32) -> np.float32:
    """float32 exp, rounded from float64 as :func:`_log32`."""
    return np.float32(np.exp(np.float64(value)))


def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
    """Half log-SNR in float32; +inf at sigma 0 (the final step of ``final_sigmas_type = "zero"``)."""
    return _log32(alpha) - _log32(sigma)


class DiffusersDPMMultistep(_DiffusersSampler):
    """diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type = "dpmsolver++"``, ``solver_order`` 1 or 2
    (``midpoint`` or ``heun``), deterministic, as the pipelines call it; with ``use_flow_sigmas`` and
    ``prediction_type = "flow_prediction"`` as ``SanaPipeline`` runs it (the model predicts the velocity, ``x0 = x -
    sigma * v``, and ``alpha_t = 1 - sigma``, ``sigma_t = sigma``).

    Tables: ``sigmas`` (num_calls,) float32 values, diffusers' ``sqrt((1 - alphas_cumprod) / alphas_cumprod)`` at each
    step (Karras' where ``use_karras_sigmas``; with flow sigmas ``s' = shift s / (1 + (shift - 1) s)`` of ``s = 1 -
    linspace(1, 1 / num_train_timesteps, N + 1)``, the last dropped, and the timesteps ``int(s' * num_train_timesteps)``),
    ``final_sigma`` the one after the last step (0 for
    ``final_sigmas_type = "zero"``) and ``orders`` (num_calls,) the solver order of each step (1 at the first and, per
    ``lower_order_final``/``euler_at_final``/``final_sigmas_type``, at the last). A step works on the data prediction
    ``x0`` of its model output and the previous step's.
    """

    kind = "diffusers_dpm_multistep"
    class_name = "DPMSolverMultistepScheduler"

    def __init__(self, options: dict, num_inference_steps: int, timesteps: np.ndarray, sigmas: np.ndarray,
                 final_sigma: float, orders: np.ndarray, where: str = "sampler"):
        self.options = options
        self.num_inference_steps = num_inference_steps
        self.timesteps = np.asarray(timesteps, dtype=np.int64)
        self.sigmas = np.asarray(sigmas, dtype=np.float32).astype(np.float64)
        self.final_sigma = float(np.float32(final_sigma))
        self.orders = np.asarray(orders, dtype=np.int64)
        every = np.append(self.sigmas, self.final_sigma)
        if not (np.all(np.diff(self.sigmas) < 0) and 0 <= self.final_sigma <= self.sigmas[-1]):
            step = int(np.argmax(np.diff(every) >= 0))
            raise SchedulerConfigError(f"{where}: sigma {every[step]:.9g} at step {step} and {every[step + 1]:.9g} "
                                       f"after it; expected the steps' sigmas strictly decreasing (a step divides by "
                                       f"the log ratio of the last two) down to the final sigma: choose fewer steps "
                                       f"or another timestep_spacing")
        if self.orders[0] != 1 or np.any(self.orders > self.options["solver_order"]):
            raise SchedulerConfigError(f"{where}: field 'orders' is {self.orders.tolist()}; expected 1 at the first "
                                       f"step and at most solver_order = {self.options['solver_order']}")
        last_order_two = self.orders[-1] == 2 and len(self.orders) > 1
        if last_order_two and (self.final_sigma == 0 or (self.final_sigma == self.sigmas[-1]
                                                         and self.options["solver_type"] == "heun")):
            # diffusers' second-order step divides by h = lambda_final - lambda_last: infinite (sigma 0) or 0.
            raise SchedulerConfigError(f"{where}: a second-order last step to sigma {self.final_sigma:.9g} from "
                                       f"{self.sigmas[-1]:.9g} has no finite update (diffusers gives NaN); expected "
                                       f"lower_order_final or euler_at_final")
        flow = bool(self.options["use_flow_sigmas"])
        if flow and not every[0] < 1:
            raise SchedulerConfigError(f"{where}: the first flow sigma is {every[0]:.9g}; expected below 1 "
                                       f"(alpha_t = 1 - sigma): choose a smaller flow_shift")
        # The step's scalars, formed in float32 exactly as diffusers forms them from its float32 sigmas.
        sigma32 = every.astype(np.float32)
        alphas, sigmas_t = zip(*(_alpha_sigma(s, flow) for s in sigma32))
        lambdas = [_lambda(a, s) for a, s in zip(alphas, sigmas_t)]
        self._alpha = np.array(alphas[:-1], dtype=np.float32)  # the data prediction's alpha_t and sigma_t
        self._sigma = np.array(sigmas_t[:-1], dtype=np.float32)
        count = len(self.timesteps)
        self._c_sample, self._c_x0, self._c_d1, self._inv_r0 = (np.zeros(count, dtype=np.float32) for _ in range(4))
        for i in range(count):
            h = lambdas[i + 1] - lambdas[i]
            phi = alphas[i + 1] * (_exp32(-h) - np.float32(1.0))
            self._c_sample[i] = sigmas_t[i + 1] / sigmas_t[i]
            self._c_x0[i] = phi
            if self.orders[i] == 2:
                with np.errstate(divide="ignore"):  # h = 0 at a last step onto sigma_min equal to its own sigma
                    self._inv_r0[i] = np.float32(1.0) / ((lambdas[i] - lambdas[i - 1]) / h)
                self._c_d1[i] = np.float32(0.5) * phi if options["solver_type"] == "midpoint" else \
                    alphas[i + 1] * ((_exp32(-h) - np.float32(1.0)) / h + np.float32(1.0))

    @classmethod
    def from_scheduler_config(cls, config: dict, num_inference_steps: int,
                              source: str) -> "DiffusersDPMMultistep":
        options = check_options(DPM_MULTISTEP_OPTIONS, config, source, cls.class_name)
        _check_flow_options(options, source)
        _check_num_steps(num_inference_steps, options, source)
        count = options["num_train_timesteps"]
        table = alphas_cumprod_of(options)
        if options["use_flow_sigmas"]:  # float64 as diffusers' numpy (no spacing); its int64 timesteps truncate
            shift = float(options["flow_shift"])
            ramp = 1.0 - np.linspace(1, 1 / count, num_inference_steps + 1)
            sigmas = np.flip(shift * ramp / (1 + (shift - 1) * ramp))[:-1].copy()
            timesteps = (sigmas * count).astype(np.int64)
        else:
            timesteps, sigmas = cls._vp_sigmas(options, table, num_inference_steps, source)
        if options["final_sigmas_type"] == "sigma_min":
            final_sigma = np.sqrt((np.float32(1.0) - table[0]) / table[0])
        else:
            final_sigma = np.float32(0.0)
        check_first_timestep_once(timesteps, options, num_inference_steps, source)
        orders = cls._orders(options, len(timesteps))
        return cls(options, num_inference_steps, timesteps, sigmas.astype(np.float32), final_sigma, orders,
                   where=f"{source} ({num_inference_steps} steps)")

    @staticmethod
    def _vp_sigmas(options: dict, table: np.ndarray, num_inference_steps: int,
                   source: str) -> tuple[np.ndarray, np.ndarray]:
        """The timesteps (int64) and sigmas (float64, Karras' or interpolated) of a variance-preserving schedule
        (UniPC's too, which has no ``lambda_min_clipped``)."""
        count = options["num_train_timesteps"]
        last_timestep = count
        if options.get("lambda_min_clipped") is not None:
            lambdas = np.log(np.sqrt(table)) - np.log(np.sqrt(np.float32(1.0) - table))
            last_timestep = count - int(np.searchsorted(lambdas[::-1], np.float32(options["lambda_min_clipped"])))
            if last_timestep < 2:
                raise SchedulerConfigError(f"{source}: field 'lambda_min_clipped' is {options['lambda_min_clipped']}"
                                           f"; it clips away every timestep but {last_timestep}")
        timesteps = _spaced_timesteps(options["timestep_spacing"], count, num_inference_steps,
                                      options["steps_offset"], last_timestep, dpm=True)
        _check_timestep_range(timesteps, options, num_inference_steps, source)
        train_sigmas = np.sqrt((np.float32(1.0) - table) / table)
        if options["use_karras_sigmas"]:
            sigmas, times = _karras_sigmas(train_sigmas, num_inference_steps)
            if options["beta_schedule"] != "squaredcos_cap_v2":
                times = times.round()
            return times.astype(np.int64), sigmas
        return timesteps, np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)

    @staticmethod
    def _orders(options: dict, count: int) -> np.ndarray:
        """The order ``step`` uses at each step of a run from the start (``lower_order_nums`` = min(i, order))."""
        orders = []
        for i in range(count):
            lower_final = i == count - 1 and (options["euler_at_final"] or options["final_sigmas_type"] == "zero"
                                              or (options["lower_order_final"] and count < 15))
            orders.append(1 if options["solver_order"] == 1 or i == 0 or lower_final else 2)
        return np.array(orders, dtype=np.int64)

    @classmethod
    def create(cls, kind: str, num_calls: int, clip_denoised: bool = False) -> "DiffusersDPMMultistep":
        """diffusers' default DPMSolverMultistepScheduler config (``clip_denoised`` has no counterpart)."""
        return cls.from_scheduler_config({}, num_calls, f"{cls.class_name} defaults")

    def _x0(self, i: int, x, model_output):
        """``convert_model_output``: the data prediction at step ``i``."""
        alpha, sigma = float(self._alpha[i]), float(self._sigma[i])
        prediction = self.options["prediction_type"]
        if prediction == "epsilon":
            return (x - sigma * model_output) / alpha
        if prediction == "sample":
            return model_output
        if prediction == "flow_prediction":  # sigma_t is the flow sigma itself
            return x - sigma * model_output
        return alpha * x - sigma * model_output  # v_prediction

    def calls(self, x, noise=None, first_step: int = 0) -> CallGenerator:
        """Yields one call per step, receives the model output (guided; learned sigma split off or not), returns the
        latents as ``output_type="latent"``. From ``first_step`` > 0 the multistep history is empty, so that step is
        first order, as diffusers' scheduler is when started there (``set_begin_index``)."""
        previous = None
        for i in range(first_step, self.num_calls):
            out = yield ModelCall(i, x, float(self.timesteps[i]))
            x0 = self._x0(i, x, self._output(x, out))
            update = float(self._c_sample[i]) * x - float(self._c_x0[i]) * x0
            if self.orders[i] == 2 and previous is not None:
                d1 = float(self._inv_r0[i]) * (x0 - previous)
                if self.options["solver_type"] == "midpoint":
                    update = update - float(self._c_d1[i]) * d1
                else:
                    update = update + float(self._c_d1[i]) * d1
            x, previous = update, x0
        return x

    def noise_level(self, call: int) -> tuple[float, float]:
        return float(self._alpha[call]), float(self._sigma[call])

    def to_dict(self) -> dict:
        return {**self._header(), "sigmas": self.sigmas.tolist(), "final_sigma": self.final_sigma,
                "orders": self.orders.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "DiffusersDPMMultistep":
        options, steps, timesteps = _section_header(data, cls.kind, DPM_MULTISTEP_OPTIONS, cls.class_name)
        _check_flow_options(options, "sampler", prefix="options/")
        final = data.get("final_sigma")
        if not (_is_number(final) and final >= 0):
            raise SchedulerConfigError(f"sampler: field 'final_sigma' is {final!r}; expected a finite number >= 0")
        return cls(options, steps, timesteps, _table(data, "sigmas", len(timesteps), 0.0, math.inf, low_open=True),
                   final, _table(data, "orders", len(timesteps), 1, 2, integer=True))


# ---------------------------------------------------------------------------------------------------------------------
# FlowMatchEulerDiscreteScheduler

def _optional_number(value) -> str | None:
    return None if value is None or _is_number(value) else "expected null or a finite number"


def _shift_terminal(value) -> str | None:
    # diffusers stretches the sigmas so that the last one is this value; 0 and null (falsy) leave them as they are
    ok = value is None or (_is_number(value) and 0 <= value < 1)
    return None if ok else "expected null or a finite number in [0, 1) (the last step's sigma)"


FLOW_MATCH_OPTIONS: dict[str, tuple[object, Check]] = {
    "num_train_timesteps": (1000, _integer(2, 1000)),
    "shift": (1.0, _positive),
    "use_dynamic_shifting": (False, _boolean),
    "base_shift": (0.5, _optional_number),  # read only with use_dynamic_shifting (null: the pipeline's default)
    "max_shift": (1.15, _optional_number),
    "base_image_seq_len": (256, _integer(1, 1 << 24)),
    "max_image_seq_len": (4096, _integer(1, 1 << 24)),
    "invert_sigmas": (False, _choice(False)),
    "shift_terminal": (None, _shift_terminal),  # Qwen-Image's 0.02
    "use_karras_sigmas": (False, _choice(False)),
    "use_exponential_sigmas": (False, _choice(False)),
    "use_beta_sigmas": (False, _choice(False)),
    "time_shift_type": ("exponential", _choice("exponential", "linear")),
    "stochastic_sampling": (False, _choice(False)),
}


@dataclass(frozen=True)
class PipelineTimesteps:
    """How a flow-matching pipeline calls ``set_timesteps``: ``image_seq_len`` the transformer's image tokens (the
    ``mu`` of dynamic shifting comes from it with the scheduler's base/max shift and sequence lengths, and the
    pipeline's defaults where the config leaves them null); ``linspace_sigmas``: the pipeline passes
    ``sigmas = np.linspace(1, 1 / N, N)`` (FluxPipeline) rather than none (StableDiffusion3Pipeline);
    ``default_max_shift`` the pipeline's fallback for ``max_shift`` (SD3 1.16, FLUX 1.15)."""

    image_seq_len: int
    linspace_sigmas: bool = False
    default_max_shift: float = 1.15

    def mu(self, options: dict) -> float:
        """The pipelines' ``calculate_shift``: linear in the image sequence length, float64."""
        base_len, max_len = options["base_image_seq_len"], options["max_image_seq_len"]
        base_shift = 0.5 if options["base_shift"] is None else options["base_shift"]
        max_shift = self.default_max_shift if options["max_shift"] is None else options["max_shift"]
        m = (max_shift - base_shift) / (max_len - base_len)
        b = base_shift - m * base_len
        return self.image_seq_len * m + b


class DiffusersFlowMatchEuler(_DiffusersSampler):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` (deterministic Euler on the velocity), as SD3 and FLUX.1
    pipelines call it: ``x_next = x + (sigma_next - sigma) * v`` in float32, the model given ``1000 * sigma``
    (float32; FLUX.1's pipeline divides it by 1000 again, inside the graph).

    Tables: ``sigmas`` (num_calls,) float32 values, descending, and ``final_sigma`` (0) after the last step; the
    model sees ``timesteps`` = ``sigmas * num_train_timesteps`` in float32. ``mu`` is the dynamic shift used (None
    without ``use_dynamic_shifting``). The samples are ``x = (1 - sigma) * x0 + sigma * noise``.
    """

    kind = "diffusers_flow_match_euler"
    class_name = "FlowMatchEulerDiscreteScheduler"

    def __init__(self, options: dict, num_inference_steps: int, sigmas: np.ndarray, mu: float | None = None,
                 where: str = "sampler"):
        self.options = options
        self.num_inference_steps = num_inference_steps
        self.mu = mu
        sigmas32 = np.asarray(sigmas, dtype=np.float32)
        if len(sigmas32) == 0 or not (np.all(np.isfinite(sigmas32)) and np.all(sigmas32 > 0)
                                      and np.all(sigmas32 <= 1) and np.all(np.diff(sigmas32) < 0)):
            raise SchedulerConfigError(f"{where}: the sigmas {sigmas32.tolist()} are not strictly decreasing in "
                                       f"(0, 1]; choose fewer steps or another shift")
        self.sigmas = sigmas32.astype(np.float64)
        self.final_sigma = 0.0
        self._timesteps32 = sigmas32 * np.float32(options["num_train_timesteps"])
        self.timesteps = self._timesteps32.astype(np.float64)
        every = np.append(sigmas32, np.float32(0.0))
        self._dt = (every[1:] - every[:-1]).astype(np.float32)  # float32, as diffusers' sigma_next - sigma

    @classmethod
    def from_scheduler_config(cls, config: dict, num_inference_steps: int, source: str,
                              pipeline: PipelineTimesteps | None = None) -> "DiffusersFlowMatchEuler":
        """``set_timesteps`` as ``pipeline`` calls it (None: no sigmas and no ``mu``, which dynamic shifting
        refuses: it needs the image sequence length)."""
        options = check_options(FLOW_MATCH_OPTIONS, config, source, cls.class_name)
        _check_num_steps(num_inference_steps, options, source)
        if options["base_image_seq_len"] >= options["max_image_seq_len"]:
            raise SchedulerConfigError(f"{source}: field 'max_image_seq_len' is {options['max_image_seq_len']}; "
                                       f"expected more than base_image_seq_len {options['base_image_seq_len']}")
        count = options["num_train_timesteps"]
        mu = None
        if options["use_dynamic_shifting"]:
            if pipeline is None:
                raise SchedulerConfigError(f"{source}: field 'use_dynamic_shifting' is true; the shift then depends "
                                           f"on the image size, which only a pipeline folder's transformer gives")
            mu = pipeline.mu(options)
        if pipeline is not None and pipeline.linspace_sigmas:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).astype(np.float32)
        else:
            # __init__'s float32 table (shifted unless dynamic), whose ends set_timesteps spaces in float64.
            train = np.linspace(1, count, count, dtype=np.float32)[::-1] / np.float32(count)
            if not options["use_dynamic_shifting"]:
                # torch casts each Python scalar operand to float32: shift, and shift - 1 formed in float64.
                shift, shift_less_one = np.float32(options["shift"]), np.float32(options["shift"] - 1)
                train = shift * train / (np.float32(1.0) + shift_less_one * train)
            sigma_max, sigma_min = float(train[0]), float(train[-1])
            sigmas = np.linspace(sigma_max * count, sigma_min * count, num_inference_steps) / count
        if options["use_dynamic_shifting"]:
            exp_mu = math.exp(mu)
            if options["time_shift_type"] == "exponential":
                sigmas = exp_mu / (exp_mu + (1 / sigmas - 1) ** 1.0)
            else:
                sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
        else:
            shift = float(options["shift"])
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        if options["shift_terminal"]:
            # stretch_shift_to_terminal, on the same numpy array (float32 where the pipeline passed sigmas)
            one_minus_z = 1 - sigmas
            if one_minus_z[-1] == 0:
                raise SchedulerConfigError(f"{source}: field 'shift_terminal' is {options['shift_terminal']!r}; at "
                                           f"{num_inference_steps} step(s) the last sigma is 1, which diffusers' "
                                           f"stretch to the terminal value divides by (NaN); choose 2 or more steps")
            scale_factor = one_minus_z[-1] / (1 - options["shift_terminal"])
            sigmas = 1 - (one_minus_z / scale_factor)
        return cls(options, num_inference_steps, np.asarray(sigmas).astype(np.float32), mu,
                   where=f"{source} ({num_inference_steps} steps)")

    @classmethod
    def create(cls, kind: str, num_calls: int, clip_denoised: bool = False) -> "DiffusersFlowMatchEuler":
        """diffusers' default FlowMatchEulerDiscreteScheduler config (``clip_denoised`` has no counterpart)."""
        return cls.from_scheduler_config({}, num_calls, f"{cls.class_name} defaults")

    @property
    def model_times(self) -> np.ndarray:
        """(num_calls,) float64: the float32 timestep ``1000 * sigma`` the pipeline gives the transformer."""
        return self.timesteps

    def step(self, s: int, x, model_output):
        """``FlowMatchEulerDiscreteScheduler.step(model_output, timesteps[s], x).prev_sample``: x + dt * v."""
        return x + float(self._dt[s]) * model_output

    def calls(self, x, noise=None, first_step: int = 0) -> CallGenerator:
        """Yields one call per step, receives the (guided) velocity, returns the latents as ``output_type="latent"``.
        ``noise`` is unused (deterministic); from ``first_step`` the Euler step needs no history."""
        for s in range(first_step, self.num_calls):
            out = yield ModelCall(s, x, float(self._timesteps32[s]))
            x = self.step(s, x, out)
        return x

    def noise_level(self, call: int) -> tuple[float, float]:
        """(1 - sigma, sigma): flow matching's interpolation ``x = (1 - sigma) * x0 + sigma * noise``."""
        sigma = float(self.sigmas[call])
        return 1.0 - sigma, sigma

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_calls": self.num_calls, "model_times": self.model_times.tolist(),
                "num_steps": self.num_steps, "num_inference_steps": self.num_inference_steps,
                "options": dict(self.options), "sigmas": self.sigmas.tolist(), "final_sigma": self.final_sigma,
                "mu": self.mu}

    @classmethod
    def from_dict(cls, data: dict) -> "DiffusersFlowMatchEuler":
        if not isinstance(data, dict) or data.get("kind") != cls.kind:
            raise SchedulerConfigError(f"sampler: field 'kind' is "
                                       f"{data.get('kind') if isinstance(data, dict) else None!r}; expected "
                                       f"{cls.kind!r}")
        options = check_options(FLOW_MATCH_OPTIONS, data.get("options"), "sampler", cls.class_name,
                                prefix="options/")
        num_calls, steps = data.get("num_calls"), data.get("num_inference_steps")
        for name, value in (("num_calls", num_calls), ("num_inference_steps", steps)):
            if not (isinstance(value, int) and not isinstance(value, bool)
                    and 1 <= value <= options["num_train_timesteps"]):
                raise SchedulerConfigError(f"sampler: field '{name}' is {value!r}; expected an integer in "
                                           f"1..{options['num_train_timesteps']}")
        if data.get("final_sigma") != 0:
            raise SchedulerConfigError(f"sampler: field 'final_sigma' is {data.get('final_sigma')!r}; expected 0")
        mu = data.get("mu")
        if (mu is None) == bool(options["use_dynamic_shifting"]) or (mu is not None and not _is_number(mu)):
            raise SchedulerConfigError(f"sampler: field 'mu' is {mu!r}; expected a finite number with "
                                       f"use_dynamic_shifting, else null")
        sampler = cls(options, steps, _table(data, "sigmas", num_calls, 0.0, 1.0, low_open=True), mu)
        model_times = _table(data, "model_times", num_calls, 0, options["num_train_timesteps"])
        if not np.array_equal(model_times, sampler.model_times):
            raise SchedulerConfigError("sampler: field 'model_times' differs from 'sigmas' * num_train_timesteps "
                                       "(float32); the model sees the scheduler's timestep")
        return sampler


# ---------------------------------------------------------------------------------------------------------------------
# Reading a scheduler config.

def read_scheduler_config(path: Path) -> dict:
    """``scheduler_config.json`` as diffusers writes it: strict JSON, except that its default
    ``lambda_min_clipped`` is written ``-Infinity``."""
    return read_folder_json(Path(path), "config", SchedulerConfigError, constants={"-Infinity": -math.inf})
