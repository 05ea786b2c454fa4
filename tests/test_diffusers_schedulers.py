"""diffusers' schedulers in numpy (l2c_export/samplers/diffusers.py) against diffusers' own, step by step.

Both are driven with the same random model outputs from the same latents; every step's latents must agree to 1e-6 of
their range (diffusers computes in float32; so do the latents here), and the timesteps exactly. diffusers is the
reference here only: the samplers themselves import neither torch nor diffusers.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import warnings

import numpy as np
import pytest

from l2c_export.samplers import (SAMPLERS, DiffusersDDIM, DiffusersDPMMultistep, SchedulerConfigError,
                                 create_sampler, official_cache_calls, sampler_from_dict, sampler_from_scheduler_config)
from l2c_export.samplers.diffusers import read_scheduler_config

from .conftest import run_cli

diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference for these tests (the project's .venv "
                                                    "has it)")
torch = pytest.importorskip("torch")

TOLERANCE = 1e-6  # of each step's latent range
SHAPE = (2, 4, 8, 8)
STEP_COUNTS = (1, 2, 12, 20, 50)
SPACINGS = ("linspace", "leading", "trailing")


def reference_scheduler(class_name: str, config: dict, steps: int, begin: int | None = None):
    cls = getattr(diffusers, class_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes of options left at their defaults
        scheduler = cls.from_config(config)
    scheduler.set_timesteps(steps)
    if begin is not None:
        scheduler.set_begin_index(begin)
    return scheduler


def reference_run(scheduler, x: np.ndarray, outputs: np.ndarray, first: int = 0) -> list[np.ndarray]:
    """The latents after each step of diffusers' scheduler, from ``x``, fed ``outputs[i]`` at step ``i``."""
    sample, latents = torch.from_numpy(x), []
    for i in range(first, len(scheduler.timesteps)):
        sample = scheduler.step(torch.from_numpy(outputs[i]), scheduler.timesteps[i], sample).prev_sample
        latents.append(sample.numpy().copy())
    return latents


def our_run(sampler, x: np.ndarray, outputs: np.ndarray, first: int = 0) -> tuple[list[np.ndarray], list[float]]:
    """The latents after each step of our sampler (what each next call sees, then the returned latents), and the
    timestep of each call."""
    calls = sampler.calls(x, first_step=first)
    call = next(calls)
    latents, times = [], []
    try:
        while True:
            times.append(call.t)
            assert call.index == first + len(latents)
            call = calls.send(outputs[call.index])
            latents.append(call.x)
    except StopIteration as done:
        latents.append(done.value)
    return latents, times


def random_inputs(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(SHAPE).astype(np.float32),
            rng.standard_normal((count, *SHAPE)).astype(np.float32))


def worst_step_error(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    assert len(ours) == len(theirs)
    return max(float(np.abs(a - b).max()) / float(b.max() - b.min()) for a, b in zip(ours, theirs))


def compare(class_name: str, config: dict, steps: int) -> float:
    """Runs both; asserts equal timesteps and the same step count; returns the worst step error over range."""
    scheduler = reference_scheduler(class_name, config, steps)
    sampler = sampler_from_scheduler_config({"_class_name": class_name, "_diffusers_version": "0.42.1", **config},
                                            steps, "scheduler_config.json")
    timesteps = scheduler.timesteps.numpy()
    assert np.array_equal(sampler.timesteps, timesteps), (config, steps)
    assert sampler.model_times.tolist() == timesteps.astype(float).tolist()
    x, outputs = random_inputs(len(timesteps))
    ours, times = our_run(sampler, x, outputs)
    assert times == [float(t) for t in timesteps]
    assert all(a.dtype == np.float32 for a in ours)
    error = worst_step_error(ours, reference_run(scheduler, x, outputs))
    if error <= TOLERANCE:
        return error
    # diffusers' own float32 result varies by CPU: torch's float32 pow(x, 0.5) of a 0-d tensor is 1 ulp off the
    # correctly rounded square root on some (an AVX2-only AMD EPYC), and DDIM's last step amplifies that by
    # 1 / sqrt(alpha_T) (157 for linear betas). There, ours must be no farther from diffusers' step run in float64
    # than diffusers' float32 run is.
    exact = reference_run(_in_float64(reference_scheduler(class_name, config, steps)), x.astype(np.float64),
                          outputs.astype(np.float64))
    theirs = worst_step_error(reference_run(scheduler, x, outputs), exact)
    assert worst_step_error(ours, exact) <= max(theirs, TOLERANCE), (config, steps, error, theirs)
    return 0.0


def _in_float64(scheduler):
    """``scheduler`` with every floating-point tensor it holds (alphas_cumprod, sigmas, ...) in float64."""
    for name, value in vars(scheduler).items():
        if torch.is_tensor(value) and value.is_floating_point():
            setattr(scheduler, name, value.double())
    return scheduler


# ---------------------------------------------------------------------------------------------------------------------
# Step by step against diffusers

DDIM_GRID = [dict(prediction_type=prediction, clip_sample=clip, set_alpha_to_one=one, beta_schedule=betas)
             for prediction, clip, one, betas in itertools.product(
                 ("epsilon", "v_prediction", "sample"), (False, True), (True, False),
                 ("linear", "scaled_linear", "squaredcos_cap_v2"))]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_ddim_matches_diffusers_step_by_step(steps, spacing):
    for options in DDIM_GRID:
        config = dict(options, timestep_spacing=spacing, clip_sample_range=0.8 if options["clip_sample"] else 1.0)
        if spacing == "leading":
            config["steps_offset"] = 1  # Stable Diffusion's
        error = compare("DDIMScheduler", config, steps)
        assert error <= TOLERANCE, (config, steps, error)


DPM_GRID = [dict(solver_order=order, solver_type=solver, lower_order_final=lower, final_sigmas_type=final,
                 use_karras_sigmas=karras, prediction_type=prediction)
            for order, solver, lower, final, karras, prediction in itertools.product(
                (1, 2), ("midpoint", "heun"), (True, False), ("zero", "sigma_min"), (False, True),
                ("epsilon", "v_prediction"))]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_dpm_multistep_matches_diffusers_step_by_step(steps, spacing):
    refused = 0
    for options in DPM_GRID:
        config = dict(options, timestep_spacing=spacing)
        try:
            error = compare("DPMSolverMultistepScheduler", config, steps)
        except SchedulerConfigError as refusal:
            # Refused only where diffusers itself has no finite answer: Karras sigmas end at sigma_min, so a
            # second-order heun last step onto sigma_min divides by h = 0.
            assert "diffusers gives NaN" in str(refusal), (config, steps, refusal)
            scheduler = reference_scheduler("DPMSolverMultistepScheduler", config, steps)
            x, outputs = random_inputs(len(scheduler.timesteps))
            assert np.isnan(reference_run(scheduler, x, outputs)[-1]).all(), (config, steps)
            refused += 1
            continue
        assert error <= TOLERANCE, (config, steps, error)
    assert refused < len(DPM_GRID) // 8


@pytest.mark.parametrize("config", [
    dict(prediction_type="sample"),
    dict(prediction_type="sample", solver_type="heun", final_sigmas_type="sigma_min"),
    dict(euler_at_final=True, lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(lambda_min_clipped=-5.1, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
    dict(lambda_min_clipped=-5.1, timestep_spacing="trailing"),
    dict(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085,
         beta_end=0.012),
    dict(num_train_timesteps=500, beta_end=0.03),
    # The schedule of PixArt-alpha's scheduler_config.json (and of DiT's, but DDIM).
    dict(algorithm_type="dpmsolver++", beta_end=0.02, beta_schedule="linear", beta_start=0.0001,
         dynamic_thresholding_ratio=0.995, euler_at_final=False, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
         lower_order_final=True, num_train_timesteps=1000, prediction_type="epsilon", sample_max_value=1.0,
         solver_order=2, solver_type="midpoint", steps_offset=0, thresholding=False, timestep_spacing="linspace",
         trained_betas=None, use_karras_sigmas=False, use_lu_lambdas=False, variance_type=None),
], ids=lambda config: ",".join(f"{k}={v}" for k, v in config.items())[:60])
@pytest.mark.parametrize("steps", (2, 12, 20))
def test_dpm_multistep_further_options_match_diffusers(config, steps):
    error = compare("DPMSolverMultistepScheduler", config, steps)
    assert error <= TOLERANCE, error


@pytest.mark.parametrize("steps", (14, 15))
def test_lower_order_final_applies_below_15_steps(steps):
    """diffusers' lower_order_final makes the last step first order only under 15 steps (with a final sigma_min)."""
    config = dict(lower_order_final=True, final_sigmas_type="sigma_min")
    sampler = sampler_from_scheduler_config({"_class_name": "DPMSolverMultistepScheduler", **config}, steps, "s")
    assert sampler.orders[-1] == (1 if steps < 15 else 2)
    assert compare("DPMSolverMultistepScheduler", config, steps) <= TOLERANCE


def test_karras_timesteps_of_the_cosine_schedule_are_truncated_and_a_repeated_first_one_refused():
    """With squaredcos_cap_v2 diffusers truncates Karras' timesteps; at 12 steps the first ones all truncate to 998,
    and diffusers' step (which starts at the second 998) runs past its sigmas: refused here, by name."""
    config = dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2")
    assert compare("DPMSolverMultistepScheduler", config, 2) <= TOLERANCE
    with pytest.raises(SchedulerConfigError, match="repeat the first timestep 998"):
        sampler_from_scheduler_config({"_class_name": "DPMSolverMultistepScheduler", **config}, 12, "s")
    scheduler = reference_scheduler("DPMSolverMultistepScheduler", config, 12)
    x, outputs = random_inputs(12)
    with pytest.raises(IndexError):
        reference_run(scheduler, x, outputs)


def test_trained_betas_match_diffusers():
    betas = np.linspace(0.0002, 0.03, 1000).tolist()
    for class_name in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        for steps in (1, 12):
            assert compare(class_name, dict(trained_betas=betas), steps) <= TOLERANCE


def test_multistep_started_later_is_diffusers_with_a_begin_index():
    """A run from step k (learning draws its start there) is first order at k, as diffusers' scheduler is when
    started there, and then multistep again."""
    config = dict(solver_order=2, final_sigmas_type="zero")
    sampler = sampler_from_scheduler_config({"_class_name": "DPMSolverMultistepScheduler", **config}, 20, "s")
    x, outputs = random_inputs(20)
    for first in (1, 7):
        scheduler = reference_scheduler("DPMSolverMultistepScheduler", config, 20, begin=first)
        ours, _ = our_run(sampler, x, outputs, first=first)
        assert worst_step_error(ours, reference_run(scheduler, x, outputs, first=first)) <= TOLERANCE


def test_a_learned_sigma_output_is_cut_to_the_latent_channels():
    """DiTPipeline and the PixArt pipelines drop the learned-sigma half before ``step``; so does the sampler."""
    for sampler in (create_sampler("diffusers_ddim", 6), create_sampler("diffusers_dpm_multistep", 6)):
        x, outputs = random_inputs(6)
        rest = np.random.default_rng(1).standard_normal(outputs.shape).astype(np.float32)
        with_sigma, _ = our_run(sampler, x, np.concatenate([outputs, rest], axis=2))
        plain, _ = our_run(sampler, x, outputs)
        assert all(np.array_equal(a, b) for a, b in zip(with_sigma, plain))


def test_noise_level_is_what_diffusers_adds():
    """(alpha, sigma) of call c: x_t = alpha * x0 + sigma * noise, as the scheduler's ``add_noise`` at that step."""
    rng = np.random.default_rng(2)
    x0, noise = (torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32)) for _ in range(2))
    for class_name, config in (("DDIMScheduler", {"timestep_spacing": "trailing"}),
                               ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})):
        scheduler = reference_scheduler(class_name, config, 12)
        sampler = sampler_from_scheduler_config({"_class_name": class_name, **config}, 12, "s")
        for call in (0, 5, 11):
            alpha, sigma = sampler.noise_level(call)
            expected = scheduler.add_noise(x0, noise, scheduler.timesteps[call:call + 1]).numpy()
            assert np.abs(alpha * x0.numpy() + sigma * noise.numpy() - expected).max() <= 1e-6 * np.ptp(expected)


# Sana's scheduler_config.json (Sana_1600M_1024px_diffusers): DPM-Solver++ 2M on flow sigmas, velocity prediction.
SANA_SCHEDULER = dict(algorithm_type="dpmsolver++", beta_end=0.02, beta_schedule="linear", beta_start=0.0001,
                      dynamic_thresholding_ratio=0.995, euler_at_final=False, final_sigmas_type="zero", flow_shift=3.0,
                      lambda_min_clipped=-math.inf, lower_order_final=True, num_train_timesteps=1000,
                      prediction_type="flow_prediction", rescale_betas_zero_snr=False, sample_max_value=1.0,
                      solver_order=2, solver_type="midpoint", steps_offset=0, thresholding=False,
                      timestep_spacing="linspace", trained_betas=None, use_beta_sigmas=False,
                      use_exponential_sigmas=False, use_flow_sigmas=True, use_karras_sigmas=False, variance_type=None)
FLOW_DPM_GRID = [dict(SANA_SCHEDULER, flow_shift=shift, solver_order=order, solver_type=solver, lower_order_final=lower,
                      final_sigmas_type=final, euler_at_final=euler)
                 for shift, order, solver, lower, final, euler in itertools.product(
                     (1.0, 3.0, 7.5), (1, 2), ("midpoint", "heun"), (True, False), ("zero", "sigma_min"),
                     (False, True))]


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_dpm_multistep_with_flow_sigmas_matches_diffusers_step_by_step(steps):
    """use_flow_sigmas with flow_prediction (Sana's folders): the timesteps (int of sigma * 1000) equal diffusers',
    and every step's latents to 1e-6 of the range, over flow shifts, orders, solver types and final sigmas."""
    for config in FLOW_DPM_GRID:
        try:
            error = compare("DPMSolverMultistepScheduler", config, steps)
        except SchedulerConfigError as refusal:
            # a final sigma_min (0.01) above the last flow sigma: diffusers would step back up the noise
            assert config["final_sigmas_type"] == "sigma_min" and "strictly decreasing" in str(refusal), refusal
            continue
        assert error <= TOLERANCE, (config, steps, error)
    sampler = sampler_from_scheduler_config({"_class_name": "DPMSolverMultistepScheduler", **SANA_SCHEDULER}, 20, "s")
    assert sampler.timesteps[0] == 999 and 2 in sampler.orders.tolist()
    alpha, sigma = sampler.noise_level(3)
    assert alpha == pytest.approx(1 - sigma) and sigma == pytest.approx(sampler.sigmas[3])


@pytest.mark.parametrize("changes,field", [
    (dict(use_flow_sigmas=False), "prediction_type"),  # the velocity without flow sigmas
    (dict(prediction_type="epsilon"), "use_flow_sigmas"),  # flow sigmas with another prediction
    (dict(use_karras_sigmas=True), "use_karras_sigmas"),  # diffusers would take Karras' VP sigmas instead
    (dict(use_dynamic_shifting=True), "use_dynamic_shifting"),
    (dict(flow_shift=0.0), "flow_shift"),
])
def test_a_flow_sigmas_option_not_implemented_is_refused_by_name(changes, field):
    config = {"_class_name": "DPMSolverMultistepScheduler", **SANA_SCHEDULER, **changes}
    with pytest.raises(SchedulerConfigError, match=rf"^DIR/scheduler_config\.json: field '{field}' "):
        sampler_from_scheduler_config(config, 12, "DIR/scheduler_config.json")


# ---------------------------------------------------------------------------------------------------------------------
# Reading scheduler configs: what is refused, by name

@pytest.mark.parametrize("class_name,field,value", [
    ("DDIMScheduler", "thresholding", True),
    ("DDIMScheduler", "rescale_betas_zero_snr", True),
    ("DDIMScheduler", "timestep_spacing", "karras"),
    ("DDIMScheduler", "prediction_type", "flow_prediction"),
    ("DDIMScheduler", "beta_schedule", "sigmoid"),
    ("DDIMScheduler", "beta_start", float("nan")),
    ("DDIMScheduler", "beta_end", 1.5),
    ("DDIMScheduler", "num_train_timesteps", 2000),
    ("DDIMScheduler", "clip_sample", "yes"),
    ("DDIMScheduler", "clip_sample_range", float("inf")),
    ("DDIMScheduler", "steps_offset", -1),
    ("DDIMScheduler", "trained_betas", [0.1, float("nan")]),
    ("DDIMScheduler", "trained_betas", [0.01] * 999),
    ("DPMSolverMultistepScheduler", "solver_order", 3),
    ("DPMSolverMultistepScheduler", "algorithm_type", "sde-dpmsolver++"),
    ("DPMSolverMultistepScheduler", "algorithm_type", "dpmsolver"),
    ("DPMSolverMultistepScheduler", "solver_type", "bh2"),
    ("DPMSolverMultistepScheduler", "thresholding", True),
    ("DPMSolverMultistepScheduler", "use_lu_lambdas", True),
    ("DPMSolverMultistepScheduler", "use_exponential_sigmas", True),
    ("DPMSolverMultistepScheduler", "use_beta_sigmas", True),
    ("DPMSolverMultistepScheduler", "use_flow_sigmas", True),
    ("DPMSolverMultistepScheduler", "use_dynamic_shifting", True),
    ("DPMSolverMultistepScheduler", "variance_type", "learned_range"),
    ("DPMSolverMultistepScheduler", "final_sigmas_type", "denoise_to_zero"),
    ("DPMSolverMultistepScheduler", "lambda_min_clipped", float("nan")),
    ("DPMSolverMultistepScheduler", "prediction_type", "flow_prediction"),
    ("DPMSolverMultistepScheduler", "clip_sample", False),  # not an option of this scheduler
    ("DDIMScheduler", "solver_order", 2),  # nor this of DDIM
])
def test_an_option_not_implemented_is_refused_by_name(class_name, field, value):
    config = {"_class_name": class_name, "_diffusers_version": "0.42.1", field: value}
    with pytest.raises(SchedulerConfigError) as refusal:
        sampler_from_scheduler_config(config, 12, "DIR/scheduler/scheduler_config.json")
    message = str(refusal.value)
    assert "\n" not in message
    assert message.startswith("DIR/scheduler/scheduler_config.json: ")
    assert f"'{field}'" in message


def test_an_unknown_scheduler_class_is_refused_naming_the_supported_ones():
    with pytest.raises(SchedulerConfigError, match=r"s\.json: field '_class_name' is 'EulerDiscreteScheduler'; "
                                                   r"supported: DDIMScheduler, DPMSolverMultistepScheduler"):
        sampler_from_scheduler_config({"_class_name": "EulerDiscreteScheduler"}, 12, "s.json")


@pytest.mark.parametrize("steps", (0, 1001, 2.0, True))
def test_a_step_count_out_of_range_is_refused(steps):
    with pytest.raises(SchedulerConfigError, match=r"s\.json: num_inference_steps \(--steps\) is"):
        sampler_from_scheduler_config({"_class_name": "DDIMScheduler"}, steps, "s.json")


def test_timesteps_outside_the_training_range_are_refused():
    """diffusers' trailing spacing gives 62 timesteps, the last -1, for 61 steps; steps_offset can run past 999."""
    for class_name in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        with pytest.raises(SchedulerConfigError, match=r"gives timestep\(s\) \[-1\], outside 0\.\.999"):
            sampler_from_scheduler_config({"_class_name": class_name, "timestep_spacing": "trailing"}, 61, "s")
        with pytest.raises(SchedulerConfigError, match="steps_offset 600"):
            sampler_from_scheduler_config({"_class_name": class_name, "timestep_spacing": "leading",
                                           "steps_offset": 600}, 2, "s")


def test_repeated_sigmas_are_refused():
    """1000 linspace steps round to repeated timesteps: the multistep update would divide by zero."""
    with pytest.raises(SchedulerConfigError, match="expected the steps' sigmas strictly decreasing"):
        sampler_from_scheduler_config({"_class_name": "DPMSolverMultistepScheduler"}, 1000, "s")


def test_a_saved_scheduler_config_reads_with_its_minus_infinity(tmp_path):
    """diffusers writes lambda_min_clipped's default as -Infinity; that file reads, a NaN one does not."""
    reference = diffusers.DPMSolverMultistepScheduler()
    reference.save_config(tmp_path)
    path = tmp_path / "scheduler_config.json"
    assert "-Infinity" in path.read_text()
    sampler = sampler_from_scheduler_config(read_scheduler_config(path), 20, str(path))
    reference.set_timesteps(20)
    assert np.array_equal(sampler.timesteps, reference.timesteps.numpy())
    assert sampler.options["lambda_min_clipped"] is None
    path.write_text(path.read_text().replace('"beta_end": 0.02', '"beta_end": NaN'))
    with pytest.raises(SchedulerConfigError, match=f"{path}: not valid JSON"):
        read_scheduler_config(path)


# ---------------------------------------------------------------------------------------------------------------------
# The manifest's sampler section

CONFIGS = [("DDIMScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
           ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "solver_type": "heun",
                                            "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}),
           ("DPMSolverMultistepScheduler", SANA_SCHEDULER)]


@pytest.mark.parametrize("class_name,config", CONFIGS)
def test_to_dict_from_dict_round_trip_through_strict_json(class_name, config):
    sampler = sampler_from_scheduler_config({"_class_name": class_name, **config}, 12, "s")
    section = json.loads(json.dumps(sampler.to_dict(), allow_nan=False))
    assert section["kind"] == sampler.kind and section["num_calls"] == 12
    again = sampler_from_dict(section)
    assert type(again) is type(sampler) and again.options == sampler.options
    assert np.array_equal(again.timesteps, sampler.timesteps)
    x, outputs = random_inputs(12)
    assert all(np.array_equal(a, b) for a, b in zip(our_run(again, x, outputs)[0], our_run(sampler, x, outputs)[0]))
    assert again.official_cache_calls() == official_cache_calls("ddim", 12) == [1, 3, 5, 7, 9, 11]


def test_the_manifest_schema_accepts_the_sections():
    jsonschema = pytest.importorskip("jsonschema")
    from l2c_export.core.manifest import schema

    for class_name, config in CONFIGS:
        section = sampler_from_scheduler_config({"_class_name": class_name, **config}, 12, "s").to_dict()
        jsonschema.validate(section, schema()["properties"]["sampler"])
        section.pop("timesteps")
        with pytest.raises(jsonschema.ValidationError, match="'timesteps' is a required property"):
            jsonschema.validate(section, schema()["properties"]["sampler"])


@pytest.mark.parametrize("class_name,table", [("DDIMScheduler", "alphas_cumprod"),
                                              ("DDIMScheduler", "alphas_cumprod_prev"),
                                              ("DPMSolverMultistepScheduler", "sigmas"),
                                              ("DPMSolverMultistepScheduler", "timesteps")])
def test_a_nan_in_a_json_manifest_table_is_refused(class_name, table):
    section = sampler_from_scheduler_config({"_class_name": class_name}, 12, "s").to_dict()
    text = json.dumps(section).replace(f'"{table}": [', f'"{table}": [NaN, ', 1)
    nested = json.loads(text)  # Python's json reads NaN; the sampler must not
    nested[table].pop()
    with pytest.raises(SchedulerConfigError, match=f"sampler: field '{table}' entry 0 is nan; expected a finite"):
        sampler_from_dict(nested)


@pytest.mark.parametrize("change,message", [
    (lambda s: s["sigmas"].pop(), "field 'sigmas' has 11 entries; expected 12"),
    (lambda s: s["sigmas"].reverse(), "expected the steps' sigmas strictly decreasing"),
    (lambda s: s["orders"].__setitem__(0, 2), "field 'orders' is"),
    (lambda s: s["orders"].__setitem__(-1, 2), "a second-order last step to sigma 0"),
    (lambda s: s.__setitem__("final_sigma", -1.0), "field 'final_sigma' is -1.0"),
    (lambda s: s["options"].__setitem__("solver_type", "bh1"), "field 'options/solver_type' is 'bh1'"),
    (lambda s: s["model_times"].__setitem__(3, 1.5), "field 'model_times' differs from 'timesteps'"),
    (lambda s: s["timesteps"].__setitem__(3, 1000), "field 'timesteps' entry 3 is 1000"),
])
def test_a_bad_manifest_section_is_refused_by_field(change, message):
    section = json.loads(json.dumps(sampler_from_scheduler_config(
        {"_class_name": "DPMSolverMultistepScheduler"}, 12, "s").to_dict()))
    change(section)
    with pytest.raises(SchedulerConfigError, match=message.replace("(", r"\(")):
        sampler_from_dict(section)


# ---------------------------------------------------------------------------------------------------------------------
# The registry

def test_the_registry_dispatches_every_kind():
    for kind, cls in SAMPLERS.items():
        sampler = create_sampler(kind, 4)
        assert isinstance(sampler, cls) and sampler.kind == kind
        assert type(sampler_from_dict(json.loads(json.dumps(sampler.to_dict())))) is cls
    assert SAMPLERS["diffusers_ddim"] is DiffusersDDIM and SAMPLERS["diffusers_dpm_multistep"] is DiffusersDPMMultistep
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        create_sampler("euler", 4)
    with pytest.raises(ValueError, match="sampler: field 'kind' is 'euler'"):
        sampler_from_dict({"kind": "euler"})


def test_a_diffusers_kind_without_a_config_is_the_schedulers_default():
    reference = reference_scheduler("DDIMScheduler", {"clip_sample": False}, 12)
    assert np.array_equal(create_sampler("diffusers_ddim", 12).timesteps, reference.timesteps.numpy())
    reference = reference_scheduler("DPMSolverMultistepScheduler", {}, 12)
    assert np.array_equal(create_sampler("diffusers_dpm_multistep", 12).timesteps, reference.timesteps.numpy())


# ---------------------------------------------------------------------------------------------------------------------
# In a build: the manifest reader, the numpy runtime and the torch reference run the same sampler

@pytest.mark.parametrize("class_name,config", [("DDIMScheduler", {"clip_sample": False}),
                                               ("DPMSolverMultistepScheduler", {"solver_type": "heun"})])
def test_a_build_runs_a_diffusers_sampler_from_its_manifest(default_build, tmp_path, class_name, config):
    """The embedded default's build (20 model calls, learned sigma) with its sampler section swapped for a diffusers
    scheduler's: the manifest validates, ``l2c-export run`` samples with it, and equals the PyTorch reference sampler
    driving the same sampler on torch tensors."""
    from l2c_export.models.zoo import embedded_default
    from l2c_export.samplers.guidance import make_noise
    from l2c_export.models.reference import sample_reference

    folder = tmp_path / "engines"
    shutil.copytree(default_build, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    sampler = sampler_from_scheduler_config({"_class_name": class_name, **config}, manifest["sampler"]["num_calls"],
                                            "s")
    manifest["sampler"] = sampler.to_dict()
    (folder / "manifest.json").write_text(json.dumps(manifest, allow_nan=False))
    noise = make_noise(3, (2, 1, 8, 8))
    np.save(tmp_path / "noise.npy", noise)
    run_cli("run", str(folder), "--labels", "1,7", "--noise", str(tmp_path / "noise.npy"), "--cfg-scale", "2.0",
            "--save-latents", str(tmp_path / "latents.npy"))
    spec = embedded_default()
    reference = sample_reference(spec.load_model(), sampler, [1, 7], noise, cfg_scale=2.0, schedule=spec.schedule(),
                                 progress=False)
    latents = np.load(tmp_path / "latents.npy")
    assert np.abs(latents - reference).max() <= 1e-4 * np.ptp(reference)
    assert np.abs(latents - noise).max() > 0.1  # it did sample


# ---------------------------------------------------------------------------------------------------------------------
# FlowMatchEulerDiscreteScheduler as StableDiffusion3Pipeline and FluxPipeline set it up

# Qwen-Image's scheduler_config.json (dynamic exponential shifting, stretched to end at sigma 0.02)
QWEN_IMAGE_SCHEDULER = {"use_dynamic_shifting": True, "time_shift_type": "exponential", "shift_terminal": 0.02,
                        "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192,
                        "shift": 1.0}
FLOW_CONFIGS = [{}, {"shift": 3.0}, {"shift": 1.7},  # SD3-medium and SD3.5 use shift 3.0
                {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                 "max_image_seq_len": 4096},  # FLUX.1-dev's
                {"use_dynamic_shifting": True, "time_shift_type": "linear", "max_shift": 1.3},
                QWEN_IMAGE_SCHEDULER,
                {"shift": 3.0, "shift_terminal": 0.1}, {"use_dynamic_shifting": True, "time_shift_type": "linear",
                                                        "shift_terminal": 0.05}]


def flow_reference(config: dict, steps: int, pipeline):
    """diffusers' scheduler with ``set_timesteps`` called as the pipeline calls it: FluxPipeline passes
    ``np.linspace(1, 1 / N, N)`` as sigmas and always ``mu``; StableDiffusion3Pipeline no sigmas, ``mu`` with
    dynamic shifting; both ``mu = calculate_shift(image_seq_len, ...)``."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift(pipeline.image_seq_len, scheduler.config.base_image_seq_len,
                         scheduler.config.max_image_seq_len, scheduler.config.base_shift, scheduler.config.max_shift)
    if pipeline.linspace_sigmas:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        scheduler.set_begin_index(0)
    else:
        scheduler.set_timesteps(steps, mu=mu if config.get("use_dynamic_shifting") else None)
    return scheduler


@pytest.mark.parametrize("steps", (1, 2, 8, 28, 50))
@pytest.mark.parametrize("flux", (False, True))
@pytest.mark.parametrize("config", FLOW_CONFIGS)
def test_flow_matching_matches_diffusers_step_by_step(config, flux, steps):
    """The timesteps the model sees are diffusers' float32 ones exactly, and every step's latents equal diffusers'
    to 1e-6 of their range, for both pipelines' ways of setting the timesteps (image sequence lengths 16 and 4096)."""
    from l2c_export.samplers import PipelineTimesteps

    for image_seq_len in (16, 4096):
        pipeline = PipelineTimesteps(image_seq_len, linspace_sigmas=flux)
        if config.get("shift_terminal") and steps == 1:  # diffusers: 0 / 0, NaN sigmas
            with pytest.raises(SchedulerConfigError, match="field 'shift_terminal' is .*; at 1 step"):
                sampler_from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **config}, steps,
                                              "scheduler_config.json", pipeline)
            continue
        scheduler = flow_reference(config, steps, pipeline)
        sampler = sampler_from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **config}, steps,
                                                "scheduler_config.json", pipeline)
        timesteps = scheduler.timesteps.numpy()
        assert sampler.model_times.tolist() == timesteps.astype(float).tolist()
        assert sampler.num_calls == steps and sampler.kind == "diffusers_flow_match_euler"
        x, outputs = random_inputs(steps)
        ours, times = our_run(sampler, x, outputs)
        assert times == [float(t) for t in timesteps] and all(a.dtype == np.float32 for a in ours)
        assert worst_step_error(ours, reference_run(scheduler, x, outputs)) <= TOLERANCE
        if config.get("use_dynamic_shifting"):
            base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            base_shift = config.get("base_shift", 0.5)
            assert sampler.mu == pytest.approx(base_shift + (config.get("max_shift", 1.15) - base_shift)
                                               * (image_seq_len - base_len) / (max_len - base_len))


def test_flow_matching_started_later_and_its_noise_level():
    """From a later step the Euler step needs no history; the samples the model sees at call i are
    ``(1 - sigma_i) x0 + sigma_i noise``, diffusers' ``scale_noise``."""
    from l2c_export.samplers import PipelineTimesteps

    pipeline = PipelineTimesteps(64, linspace_sigmas=True)
    config = {"use_dynamic_shifting": True}
    scheduler = flow_reference(config, 10, pipeline)
    scheduler.set_begin_index(4)
    sampler = sampler_from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **config}, 10, "s",
                                            pipeline)
    x, outputs = random_inputs(10, seed=3)
    assert worst_step_error(our_run(sampler, x, outputs, first=4)[0], reference_run(scheduler, x, outputs, 4)) <= \
        TOLERANCE
    noise, x0 = random_inputs(1, seed=5)
    alpha, sigma = sampler.noise_level(6)
    noising = flow_reference(config, 10, pipeline)
    noising.set_begin_index(6)
    want = noising.scale_noise(torch.from_numpy(x0[0]), scheduler.timesteps[6:7], torch.from_numpy(noise))
    assert alpha == pytest.approx(1 - sigma) and sigma == pytest.approx(float(scheduler.sigmas[6]))
    assert np.abs(alpha * x0[0] + sigma * noise - want.numpy()).max() <= 1e-6


@pytest.mark.parametrize("steps", (2, 12, 50))
def test_qwen_image_timesteps_are_the_pipelines(steps):
    """QwenImagePipeline's own calculate_shift (the folder's base/max image sequence lengths and shifts), its
    ``sigmas = linspace(1, 1 / N, N)`` and ``mu``, then the exponential time shift and the stretch to
    ``shift_terminal``: the timesteps equal diffusers' exactly, every step's latents to 1e-6 of their range, and the
    last sigma is the terminal one."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from l2c_export.models.diffusers import DiffusersConfig
    from l2c_export.models.diffusers.qwenimage import FAMILY

    for image_seq_len in (16, 4096):
        config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **QWEN_IMAGE_SCHEDULER}
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
        mu = calculate_shift(image_seq_len, scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                             scheduler.config.get("max_shift", 1.15))
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        scheduler.set_begin_index(0)
        side = 2 * math.isqrt(image_seq_len)  # latents on a side: (side / 2)^2 packed tokens
        pipeline = FAMILY.pipeline_timesteps(DiffusersConfig(FAMILY.transformer_class, {}, latent_size=side))
        sampler = sampler_from_scheduler_config(config, steps, "scheduler_config.json", pipeline)
        assert sampler.mu == mu
        assert sampler.model_times.tolist() == scheduler.timesteps.numpy().astype(float).tolist()
        assert sampler.sigmas[-1] == pytest.approx(0.02, abs=1e-7)
        x, outputs = random_inputs(steps)
        assert worst_step_error(our_run(sampler, x, outputs)[0], reference_run(scheduler, x, outputs)) <= TOLERANCE


@pytest.mark.parametrize("field, value", [("invert_sigmas", True), ("shift_terminal", 1.0), ("shift_terminal", -0.1),
                                          ("use_karras_sigmas", True), ("use_exponential_sigmas", True),
                                          ("use_beta_sigmas", True), ("stochastic_sampling", True),
                                          ("time_shift_type", "cosine"), ("shift", 0.0), ("shift", float("nan")),
                                          ("max_image_seq_len", 100), ("prediction_type", "epsilon")])
def test_a_flow_matching_option_not_implemented_is_refused_by_name(field, value):
    from l2c_export.samplers import PipelineTimesteps

    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1", field: value}
    with pytest.raises(SchedulerConfigError) as refusal:
        sampler_from_scheduler_config(config, 12, "DIR/scheduler/scheduler_config.json", PipelineTimesteps(16))
    message = str(refusal.value)
    assert "\n" not in message and message.startswith("DIR/scheduler/scheduler_config.json: field ")
    assert f"'{field}'" in message


def test_dynamic_shifting_needs_the_pipelines_image_size():
    with pytest.raises(SchedulerConfigError, match="field 'use_dynamic_shifting' is true; the shift then depends on "
                                                   "the image size"):
        sampler_from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                       "use_dynamic_shifting": True}, 12, "s")


@pytest.mark.parametrize("config", [{"shift": 3.0}, {"use_dynamic_shifting": True}, QWEN_IMAGE_SCHEDULER])
def test_a_flow_matching_section_round_trips_and_its_damage_is_refused_by_field(config):
    jsonschema = pytest.importorskip("jsonschema")
    from l2c_export.core.manifest import schema
    from l2c_export.samplers import PipelineTimesteps

    sampler = sampler_from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **config}, 12, "s",
                                            PipelineTimesteps(256, linspace_sigmas=True))
    section = json.loads(json.dumps(sampler.to_dict(), allow_nan=False))
    jsonschema.validate(section, schema()["properties"]["sampler"])
    again = sampler_from_dict(section)
    assert again.model_times.tolist() == sampler.model_times.tolist() and again.mu == sampler.mu
    x, outputs = random_inputs(12)
    assert all(np.array_equal(a, b) for a, b in zip(our_run(again, x, outputs)[0], our_run(sampler, x, outputs)[0]))
    for change, message in [(lambda s: s["sigmas"].reverse(), "not strictly decreasing"),
                            (lambda s: s["sigmas"].__setitem__(0, 1.5), "field 'sigmas' entry 0 is 1.5"),
                            (lambda s: s["model_times"].__setitem__(2, 1.0), "field 'model_times' differs"),
                            (lambda s: s.__setitem__("final_sigma", 0.1), "field 'final_sigma' is 0.1"),
                            (lambda s: s.__setitem__("mu", None if s["mu"] is not None else 1.0), "field 'mu' is"),
                            (lambda s: s["options"].__setitem__("invert_sigmas", True),
                             "field 'options/invert_sigmas' is True")]:
        damaged = json.loads(json.dumps(section))
        change(damaged)
        with pytest.raises(SchedulerConfigError, match=message):
            sampler_from_dict(damaged)


# ---------------------------------------------------------------------------------------------------------------------
# UniPCMultistepScheduler (issue 30): Wan's scheduler, and the variance-preserving one of DiT/PixArt folders

# Wan2.1-T2V-1.3B-Diffusers' scheduler_config.json: UniPC bh2, order 2, on flow sigmas shifted by 3, the velocity
WAN_SCHEDULER = dict(beta_end=0.02, beta_schedule="linear", beta_start=0.0001, disable_corrector=[],
                     dynamic_thresholding_ratio=0.995, final_sigmas_type="zero", flow_shift=3.0, lower_order_final=True,
                     num_train_timesteps=1000, predict_x0=True, prediction_type="flow_prediction",
                     rescale_betas_zero_snr=False, sample_max_value=1.0, solver_order=2, solver_p=None,
                     solver_type="bh2", steps_offset=0, thresholding=False, timestep_spacing="linspace",
                     trained_betas=None, use_beta_sigmas=False, use_exponential_sigmas=False, use_flow_sigmas=True,
                     use_karras_sigmas=False)
# every solver type, final sigma, order and lower_order_final; predictions, predict_x0 and spacings in turn
UNIPC_GRID = [dict(solver_type=solver, final_sigmas_type=final, solver_order=order, lower_order_final=lower,
                   prediction_type=("epsilon", "v_prediction", "sample")[i % 3], predict_x0=i % 4 != 1,
                   timestep_spacing=SPACINGS[i % 3], steps_offset=1 if SPACINGS[i % 3] == "leading" else 0)
              for i, (solver, final, order, lower) in enumerate(itertools.product(
                  ("bh1", "bh2"), ("zero", "sigma_min"), (1, 2, 3), (True, False)))]
UNIPC_FLOW_GRID = [dict(WAN_SCHEDULER, solver_type=solver, final_sigmas_type=final, solver_order=order,
                        lower_order_final=lower, flow_shift=(3.0, 5.0, 1.0)[i % 3])
                   for i, (solver, final, order, lower) in enumerate(itertools.product(
                       ("bh1", "bh2"), ("zero", "sigma_min"), (1, 2, 3), (True, False)))]


def compare_unipc(config: dict, steps: int, first: int = 0) -> float:
    """:func:`compare` for UniPC, from step ``first`` (diffusers' ``set_begin_index``). The update's weights come
    from a recursion whose float32 cancellation loses about a digit per order, so diffusers' own result moves with
    the last bit of torch's float32 log, expm1 and pow (which differ across CPUs; a few 1e-6 of the range at order 3
    over 50 steps): where ours is not within 1e-6 of diffusers, it must be no farther from it than twice what
    diffusers' own result moves when its sigma table is float64 (the same float32 samples)."""
    class_name = "UniPCMultistepScheduler"
    scheduler = reference_scheduler(class_name, config, steps, begin=first or None)
    sampler = sampler_from_scheduler_config({"_class_name": class_name, "_diffusers_version": "0.42.1", **config},
                                            steps, "scheduler_config.json")
    timesteps = scheduler.timesteps.numpy()
    assert np.array_equal(sampler.timesteps, timesteps), (config, steps)
    x, outputs = random_inputs(len(timesteps))
    ours, times = our_run(sampler, x, outputs, first)
    assert times == [float(t) for t in timesteps[first:]] and all(a.dtype == np.float32 for a in ours)
    theirs = reference_run(scheduler, x, outputs, first)
    error = worst_step_error(ours, theirs)
    if error <= TOLERANCE:
        return error
    exact_scalars = reference_run(_in_float64(reference_scheduler(class_name, config, steps, begin=first or None)), x,
                                  outputs, first)
    assert error <= 2 * worst_step_error(theirs, exact_scalars), (config, steps, error)
    return 0.0


def assert_diffusers_has_no_finite_answer(config: dict, steps: int, refusal: Exception) -> None:
    """Refused only where diffusers' own run ends in NaN or infinity, or fails (a singular solve)."""
    assert "has no finite update" in str(refusal), (config, steps, refusal)
    scheduler = reference_scheduler("UniPCMultistepScheduler", config, steps)
    x, outputs = random_inputs(len(scheduler.timesteps))
    try:
        last = reference_run(scheduler, x, outputs)[-1]
    except RuntimeError:  # torch.linalg.solve: singular
        return
    assert not np.isfinite(last).all(), (config, steps)


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_unipc_matches_diffusers_step_by_step(steps):
    """Over solver types, final sigmas, orders 1-3, lower_order_final, predictions and predict_x0 (variance-
    preserving, every spacing) and over Wan's flow sigmas (shifts 1, 3, 5): the timesteps equal diffusers', every
    step's latents to 1e-6 of their range, and what is refused has no finite answer in diffusers either."""
    refused = 0
    for config in UNIPC_GRID + UNIPC_FLOW_GRID:
        try:
            error = compare_unipc(config, steps)
        except SchedulerConfigError as refusal:
            assert_diffusers_has_no_finite_answer(config, steps, refusal)
            refused += 1
            continue
        assert error <= TOLERANCE, (config, steps, error)
    assert refused < len(UNIPC_GRID + UNIPC_FLOW_GRID) // 2


@pytest.mark.parametrize("config", [
    WAN_SCHEDULER,
    dict(WAN_SCHEDULER, flow_shift=5.0, solver_order=3),  # Wan2.1 14B 720p's shift
    dict(disable_corrector=[0, 3, 5]),
    dict(solver_order=3, disable_corrector=[1]),
    dict(prediction_type="sample", predict_x0=False, final_sigmas_type="sigma_min"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
         steps_offset=1),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(num_train_timesteps=500, beta_end=0.03, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(trained_betas=np.linspace(0.0002, 0.03, 1000).tolist()),
], ids=["wan", "wan-14b-order3", "disable-corrector", "order3-disable", "sample-eps", "scaled-leading",
        "cosine-v-trailing", "train500-bh1", "trained-betas"])
@pytest.mark.parametrize("steps", (1, 2, 12, 20))
def test_unipc_further_options_match_diffusers(config, steps):
    assert compare_unipc(config, steps) <= TOLERANCE


def test_unipc_started_later_is_diffusers_with_a_begin_index():
    """A run from step k (learning draws its start there) has no history at k: first order, no corrector there, as
    diffusers' scheduler started with ``set_begin_index``; then multistep with the corrector again."""
    for config in (WAN_SCHEDULER, dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min")):
        for first in (1, 7):
            assert compare_unipc(config, 20, first) <= TOLERANCE


def test_unipc_noise_level_is_what_diffusers_adds():
    rng = np.random.default_rng(2)
    x0, noise = (torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32)) for _ in range(2))
    for config in (WAN_SCHEDULER, {"timestep_spacing": "trailing"}):
        scheduler = reference_scheduler("UniPCMultistepScheduler", config, 12)
        sampler = sampler_from_scheduler_config({"_class_name": "UniPCMultistepScheduler", **config}, 12, "s")
        for call in (0, 5, 11):
            alpha, sigma = sampler.noise_level(call)
            expected = scheduler.add_noise(x0, noise, scheduler.timesteps[call:call + 1]).numpy()
            assert np.abs(alpha * x0.numpy() + sigma * noise.numpy() - expected).max() <= 1e-6 * np.ptp(expected)
    assert sampler_from_scheduler_config({"_class_name": "UniPCMultistepScheduler", **WAN_SCHEDULER}, 12,
                                         "s").timesteps[0] == 999


@pytest.mark.parametrize("field,value", [
    ("solver_order", 4), ("solver_type", "midpoint"), ("solver_p", {"_class_name": "DDIMScheduler"}),
    ("thresholding", True), ("use_karras_sigmas", True), ("use_exponential_sigmas", True), ("use_beta_sigmas", True),
    ("use_dynamic_shifting", True), ("shift_terminal", 0.1), ("sigma_min", 0.1), ("rescale_betas_zero_snr", True),
    ("disable_corrector", [-1]), ("disable_corrector", "0"), ("predict_x0", 1),
    ("final_sigmas_type", "denoise_to_zero"),
    ("timestep_spacing", "karras"), ("prediction_type", "flow_prediction"), ("use_flow_sigmas", True),
    ("flow_shift", -1.0), ("algorithm_type", "dpmsolver++"),  # DPM-Solver's option, not UniPC's
])
def test_a_unipc_option_not_implemented_is_refused_by_name(field, value):
    config = {"_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.42.1", field: value}
    with pytest.raises(SchedulerConfigError) as refusal:
        sampler_from_scheduler_config(config, 12, "DIR/scheduler/scheduler_config.json")
    message = str(refusal.value)
    assert "\n" not in message and message.startswith("DIR/scheduler/scheduler_config.json: ")
    assert f"'{field}'" in message


def test_unipc_flow_prediction_needs_the_data_prediction():
    with pytest.raises(SchedulerConfigError, match=r"^s: field 'predict_x0' is false with prediction_type "
                                                   r"'flow_prediction'"):
        sampler_from_scheduler_config({"_class_name": "UniPCMultistepScheduler", **WAN_SCHEDULER,
                                       "predict_x0": False}, 12, "s")


@pytest.mark.parametrize("config", [WAN_SCHEDULER, dict(solver_order=3, predict_x0=False,
                                                        final_sigmas_type="sigma_min", disable_corrector=[2])])
def test_a_unipc_section_round_trips_and_its_damage_is_refused_by_field(config):
    jsonschema = pytest.importorskip("jsonschema")
    from l2c_export.core.manifest import schema

    sampler = sampler_from_scheduler_config({"_class_name": "UniPCMultistepScheduler", **config}, 12, "s")
    section = json.loads(json.dumps(sampler.to_dict(), allow_nan=False))
    jsonschema.validate(section, schema()["properties"]["sampler"])
    assert section["kind"] == "diffusers_unipc" and section["num_calls"] == 12
    again = sampler_from_dict(section)
    assert again.options == sampler.options and np.array_equal(again.timesteps, sampler.timesteps)
    x, outputs = random_inputs(12)
    assert all(np.array_equal(a, b) for a, b in zip(our_run(again, x, outputs)[0], our_run(sampler, x, outputs)[0]))
    assert again.official_cache_calls() == official_cache_calls("diffusers_unipc", 12) == [1, 3, 5, 7, 9, 11]
    for change, message in [(lambda s: s["sigmas"].pop(), "field 'sigmas' has 11 entries; expected 12"),
                            (lambda s: s["sigmas"].reverse(), "expected the steps' sigmas strictly decreasing"),
                            (lambda s: s["orders"].__setitem__(0, 2), "field 'orders' is"),
                            (lambda s: s.__setitem__("final_sigma", -1.0), "field 'final_sigma' is -1.0"),
                            (lambda s: s["options"].__setitem__("solver_type", "heun"),
                             "field 'options/solver_type' is 'heun'"),
                            (lambda s: s["options"].__setitem__("disable_corrector", [True]),
                             "field 'options/disable_corrector' is"),
                            (lambda s: s["model_times"].__setitem__(3, 1.5), "field 'model_times' differs")]:
        damaged = json.loads(json.dumps(section))
        change(damaged)
        with pytest.raises(SchedulerConfigError, match=message.replace("(", r"\(")):
            sampler_from_dict(damaged)
    final_zero = json.loads(json.dumps(section))
    final_zero["orders"][-1] = 2
    if config is WAN_SCHEDULER:  # a second-order last step onto sigma 0: no finite update in diffusers
        with pytest.raises(SchedulerConfigError, match="the order-2 predictor of step 11 onto sigma 0 has no finite"):
            sampler_from_dict(final_zero)
