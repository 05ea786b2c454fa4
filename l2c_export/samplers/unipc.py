"""diffusers' ``UniPCMultistepScheduler`` (UniPC: a unified predictor-corrector, Zhao et al. 2023) as a sampler, as
Wan's folders ship it and the pipelines run it.

Hand-written in numpy only because the runtime has no torch: diffusers' scheduler is torch code, and the samplers run
where torch is not (the numpy runtime, the Triton model, the C++ runtime, which reads the same manifest section and
forms the same coefficients). It reproduces diffusers 0.42's ``set_timesteps`` and ``step``: the scalars of a step
formed in float32 operation by operation from the float32 sigmas, as diffusers forms them from its tensors, so that on
float32 samples a step matches diffusers' own to float32 rounding. The exception is the weights of the differences
where diffusers solves for them (the order-3 predictor, the order-2 and 3 corrector): their recursion loses about a
digit per order to cancellation in float32, so diffusers' own values move with the last bit of torch's float32 log and
expm1 (which differ across CPUs); here they are formed in float64 and solved by Gaussian elimination
(:func:`solve_small`, the C++ runtime's too), then rounded to float32.

Implemented: the variance-preserving betas (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``, ``trained_betas``)
with the ``linspace``, ``leading`` and ``trailing`` timestep spacings, and flow sigmas (``use_flow_sigmas`` with
``prediction_type = "flow_prediction"`` and ``flow_shift``, Wan's); ``prediction_type`` ``epsilon``, ``v_prediction``,
``sample``; ``predict_x0`` true and false (false: the noise prediction, not with flow); ``solver_type`` ``bh1`` and
``bh2``; ``solver_order`` 1 to 3 with ``lower_order_final``; the corrector (UniC) with ``disable_corrector``;
``final_sigmas_type`` ``zero`` and ``sigma_min``. Anything else is refused by name (:class:`SchedulerConfigError`), and
so is a combination where diffusers itself has no finite answer (``bh1`` or ``predict_x0`` false onto a final sigma of
zero, a higher-order last step onto it without ``lower_order_final``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .base import CallGenerator, ModelCall
from .diffusers import (_BETAS_OPTIONS, Check, DiffusersDPMMultistep, SchedulerConfigError, _DiffusersSampler,
                        _alpha_sigma, _boolean, _check_flow_options, _check_num_steps, _choice, _is_number, _lambda,
                        _positive, _section_header, _table, alphas_cumprod_of, check_first_timestep_once,
                        check_options)


def _step_indices(value) -> str | None:
    ok = isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
    return None if ok else "expected a list of step indices (integers >= 0)"


UNIPC_OPTIONS: dict[str, tuple[object, Check]] = {
    **_BETAS_OPTIONS,
    "solver_order": (2, _choice(1, 2, 3)),
    # flow_prediction (the velocity) goes with use_flow_sigmas and the other three without (_check_flow_options)
    "prediction_type": ("epsilon", _choice("epsilon", "sample", "v_prediction", "flow_prediction")),
    "predict_x0": (True, _boolean),
    "solver_type": ("bh2", _choice("bh1", "bh2")),
    "lower_order_final": (True, _boolean),
    "disable_corrector": ([], _step_indices),  # the corrector after step i is left out for i in the list
    "solver_p": (None, _choice(None)),
    "use_karras_sigmas": (False, _choice(False)),
    "use_exponential_sigmas": (False, _choice(False)),
    "use_beta_sigmas": (False, _choice(False)),
    "use_flow_sigmas": (False, _boolean),  # Wan's: sigmas linspace(1, 1/T, N+1)[:-1] shifted by flow_shift
    "flow_shift": (1.0, _positive),  # read only with flow sigmas
    "timestep_spacing": ("linspace", _choice("linspace", "leading", "trailing")),  # not read with flow sigmas
    "final_sigmas_type": ("zero", _choice("zero", "sigma_min")),
    "use_dynamic_shifting": (False, _choice(False)),
    "time_shift_type": ("exponential", _choice("exponential")),
    "sigma_min": (None, _choice(None)),  # read only with Karras sigmas
    "sigma_max": (None, _choice(None)),
    "shift_terminal": (None, _choice(None)),
}


def _expm1_32(value: np.float32) -> np.float32:
    """float32 expm1, rounded from float64 as :func:`l2c_export.samplers.diffusers._log32`; -1 at -inf."""
    return np.float32(np.expm1(np.float64(value)))


def _lambda64(sigma: float, flow: bool) -> np.float64:
    """Half log-SNR in float64 of a float32 sigma (+inf at 0): alpha = 1 - sigma with flow sigmas, else
    1 / sqrt(sigma^2 + 1); sigma_t = sigma * alpha (flow: sigma)."""
    alpha = 1.0 - sigma if flow else 1.0 / math.sqrt(sigma * sigma + 1.0)
    sigma_t = sigma if flow else sigma * alpha
    return np.float64(math.inf) if sigma_t == 0 else np.float64(math.log(alpha) - math.log(sigma_t))


def solve_small(matrix: list[list[float]], vector: list[float]) -> list[np.float32]:
    """``matrix @ x = vector`` for a 2 x 2 or 3 x 3 system: Gaussian elimination with partial pivoting (the first
    largest pivot) in float64, the result rounded to float32; NaN where a pivot is zero or not finite. The C++
    runtime's ``solve_small`` is this, line for line."""
    n = len(vector)
    a = [[float(v) for v in row] + [float(vector[i])] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        if not a[col][col] or not math.isfinite(a[col][col]):
            return [np.float32(np.nan)] * n
        for row in range(col + 1, n):
            factor = a[row][col] / a[col][col]
            for k in range(col, n + 1):
                a[row][k] -= factor * a[col][k]
    x = [0.0] * n
    for row in reversed(range(n)):
        total = a[row][n]
        for k in range(row + 1, n):
            total -= a[row][k] * x[k]
        x[row] = total / a[row][row]
    return [np.float32(v) for v in x]


@dataclass(frozen=True)
class UniUpdate:
    """One UniP (predictor) or UniC (corrector) update from the step at ``s0`` to the next sigma, float32 scalars:

        x_next = c_x * x - c_m0 * m0 - c_b * (sum_k rhos[k] * (m_k - m0) / rks[k]  [+ rhos[-1] * (m_t - m0)])

    ``m0`` the converted model output at ``s0``, ``m_k`` the one k steps before it, ``m_t`` (corrector only) the one at
    the next sigma; the predictor has ``order - 1`` rhos (none at order 1), the corrector ``order``."""

    c_x: np.float32
    c_m0: np.float32
    c_b: np.float32
    rks: tuple[np.float32, ...]
    rhos: tuple[np.float32, ...]

    def finite(self) -> bool:
        """Whether diffusers' update has a finite result: every coefficient finite and no ``rk`` zero (an
        infinite ``rk``, from a last step onto its own sigma, only zeroes its difference)."""
        used = (self.c_x, self.c_m0, self.c_b, *self.rhos)  # c_b even at order 1: diffusers multiplies it by 0
        return all(np.isfinite(v) for v in used) and all(r != 0 and not np.isnan(r) for r in self.rks)


class DiffusersUniPC(_DiffusersSampler):
    """diffusers' ``UniPCMultistepScheduler`` (``solver_p`` none), as the pipelines call it: one model call per step at
    the integer timestep.

    Step ``i`` converts the model output at the sample the model saw into a data prediction (``predict_x0``; else a
    noise prediction); unless ``i - 1`` is in ``disable_corrector``, the corrector then replaces that sample, from the
    previous step's sample and predictions, at the previous step's order; the predictor steps the (corrected) sample
    to the next sigma at ``orders[i]``.

    Tables: ``sigmas`` (num_calls,) float32 values, diffusers' ``sqrt((1 - alphas_cumprod) / alphas_cumprod)`` at each
    step, or with flow sigmas ``s' = shift s / (1 + (shift - 1) s)`` of ``s = linspace(1, 1 / num_train_timesteps,
    N + 1)[:-1]`` (the first moved 1e-6 below 1) and the timesteps ``int(s' * num_train_timesteps)``; ``final_sigma``
    after the last step (0 for ``final_sigmas_type = "zero"``); ``orders`` (num_calls,) the predictor's order at each
    step of a run from the first (``min(solver_order, i + 1)``, and ``N - i`` at the end with ``lower_order_final``).
    A run started later (``first_step``) has no history there, as diffusers' scheduler started with
    ``set_begin_index``: orders from 1 again, no corrector at its first step.
    """

    kind = "diffusers_unipc"
    class_name = "UniPCMultistepScheduler"

    def __init__(self, options: dict, num_inference_steps: int, timesteps: np.ndarray, sigmas: np.ndarray,
                 final_sigma: float, orders: np.ndarray, where: str = "sampler"):
        self.options = options
        self.num_inference_steps = num_inference_steps
        self.timesteps = np.asarray(timesteps, dtype=np.int64)
        self.sigmas = np.asarray(sigmas, dtype=np.float32).astype(np.float64)
        self.final_sigma = float(np.float32(final_sigma))
        self.orders = np.asarray(orders, dtype=np.int64)
        every = np.append(self.sigmas, self.final_sigma)
        rising = [i for i in range(len(self.sigmas) - 1) if not self.sigmas[i + 1] < self.sigmas[i]]
        if rising or not 0 <= self.final_sigma <= self.sigmas[-1]:  # the final sigma may equal the last (sigma_min)
            step = rising[0] if rising else len(self.sigmas) - 1
            raise SchedulerConfigError(f"{where}: sigma {every[step]:.9g} at step {step} and {every[step + 1]:.9g} "
                                       f"after it; expected the steps' sigmas strictly decreasing (a step divides by "
                                       f"the log ratio of the last two) down to the final sigma: choose fewer steps "
                                       f"or another timestep_spacing")
        if options["use_flow_sigmas"] and not every[0] < 1:
            raise SchedulerConfigError(f"{where}: the first flow sigma is {every[0]:.9g}; expected below 1 "
                                       f"(alpha_t = 1 - sigma)")
        limits = [min(options["solver_order"], i + 1) for i in range(len(self.orders))]
        if len(self.orders) != len(self.timesteps) or any(not 1 <= o <= m for o, m in zip(self.orders, limits)):
            raise SchedulerConfigError(f"{where}: field 'orders' is {self.orders.tolist()}; expected at step i an "
                                       f"order in 1..min(solver_order = {options['solver_order']}, i + 1)")
        flow = bool(options["use_flow_sigmas"])
        alphas, sigmas_t = zip(*(_alpha_sigma(s, flow) for s in every.astype(np.float32)))
        self._alpha, self._sigma_t = np.array(alphas, dtype=np.float32), np.array(sigmas_t, dtype=np.float32)
        self._lambdas = [_lambda(a, s) for a, s in zip(alphas, sigmas_t)]
        self._lambdas64 = [_lambda64(float(s), flow) for s in every.astype(np.float32)]
        self._updates: dict[tuple[int, int, bool], UniUpdate] = {}
        for i, order in enumerate(self.orders):
            runs = [("predictor of", self._update(i, int(order), False))]
            if i + 1 < len(self.orders) and i not in options["disable_corrector"]:
                runs.append(("corrector after", self._update(i, int(order), True)))
            for name, update in runs:
                if not update.finite():
                    raise SchedulerConfigError(
                        f"{where}: the order-{order} {name} step {i} onto sigma {every[i + 1]:.9g} has no finite "
                        f"update (diffusers gives NaN or infinity); expected solver_type 'bh2' with predict_x0 true "
                        f"and lower_order_final onto a final sigma of zero, or final_sigmas_type 'sigma_min'")

    @classmethod
    def from_scheduler_config(cls, config: dict, num_inference_steps: int, source: str) -> "DiffusersUniPC":
        options = check_options(UNIPC_OPTIONS, config, source, cls.class_name)
        _check_flow_options(options, source)
        if options["prediction_type"] == "flow_prediction" and not options["predict_x0"]:
            raise SchedulerConfigError(f"{source}: field 'predict_x0' is false with prediction_type "
                                       f"'flow_prediction'; diffusers converts the velocity to the data prediction "
                                       f"only (expected true)")
        _check_num_steps(num_inference_steps, options, source)
        count = options["num_train_timesteps"]
        table = alphas_cumprod_of(options)
        if options["use_flow_sigmas"]:  # float64 as diffusers' numpy; its int64 timesteps truncate
            shift = float(options["flow_shift"])
            sigmas = np.linspace(1, 1 / count, num_inference_steps + 1)[:-1]
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
            if np.fabs(sigmas[0] - 1) < 1e-6:
                sigmas[0] -= 1e-6
            timesteps = (sigmas * count).astype(np.int64)
            final_sigma = sigmas[-1] if options["final_sigmas_type"] == "sigma_min" else 0.0
        else:
            timesteps, sigmas = DiffusersDPMMultistep._vp_sigmas(options, table, num_inference_steps, source)
            if options["final_sigmas_type"] == "sigma_min":
                final_sigma = np.sqrt((np.float32(1.0) - table[0]) / table[0])
            else:
                final_sigma = 0.0
        check_first_timestep_once(timesteps, options, num_inference_steps, source)
        return cls(options, num_inference_steps, timesteps, sigmas.astype(np.float32), np.float32(final_sigma),
                   cls._orders(options, len(timesteps)), where=f"{source} ({num_inference_steps} steps)")

    @staticmethod
    def _orders(options: dict, count: int) -> np.ndarray:
        """The predictor's order at each step of a run from the first (``this_order``)."""
        order = options["solver_order"]
        caps = [min(order, count - i) if options["lower_order_final"] else order for i in range(count)]
        return np.array([min(cap, i + 1) for i, cap in enumerate(caps)], dtype=np.int64)

    @classmethod
    def create(cls, kind: str, num_calls: int, clip_denoised: bool = False) -> "DiffusersUniPC":
        """diffusers' default UniPCMultistepScheduler config (``clip_denoised`` has no counterpart)."""
        return cls.from_scheduler_config({}, num_calls, f"{cls.class_name} defaults")

    def _update(self, s0: int, order: int, corrector: bool) -> UniUpdate:
        """The update from step ``s0`` to the next sigma at ``order`` (``multistep_uni_p_bh_update`` or, for the
        corrector of step ``s0 + 1``, ``multistep_uni_c_bh_update``): ``c_x``, ``c_m0``, ``c_b`` and ``rks`` as
        diffusers forms them in float32, the rhos from :meth:`_rhos`."""
        key = (s0, order, corrector)
        if key in self._updates:
            return self._updates[key]
        lambdas, t = self._lambdas, s0 + 1
        with np.errstate(all="ignore"):  # the last step onto sigma 0 (h infinite) or onto its own sigma (h 0)
            h = lambdas[t] - lambdas[s0]
            rks = tuple((lambdas[s0 - k] - lambdas[s0]) / h for k in range(1, order))
            hh = -h if self.options["predict_x0"] else h
            h_phi_1 = _expm1_32(hh)
            b_h = hh if self.options["solver_type"] == "bh1" else _expm1_32(hh)
            if self.options["predict_x0"]:
                scale, other = self._alpha[t], self._sigma_t
            else:
                scale, other = self._sigma_t[t], self._alpha
            update = UniUpdate(c_x=other[t] / other[s0], c_m0=scale * h_phi_1, c_b=scale * b_h, rks=rks,
                               rhos=self._rhos(s0, order, corrector))
        self._updates[key] = update
        return update

    def _rhos(self, s0: int, order: int, corrector: bool) -> tuple[np.float32, ...]:
        """The update's weights of the differences: 0.5 for the order-2 predictor and the order-1 corrector, none for
        the order-1 predictor, else the solution of ``R rhos = b`` (the predictor's without the last row and
        column). ``b`` comes from the recursion ``h_phi_k = h_phi_{k-1} / hh - 1 / k!``, whose cancellation loses
        about a digit per order: diffusers' float32 result is off the exact one by more than torch's 1-ulp log and
        expm1 differences across CPUs reproduce, so this is formed in float64 (Python's libm ``log``/``expm1``, as
        the C++ runtime's) from the float32 sigmas, and rounded to float32 at the end."""
        if order == 1:
            return (np.float32(0.5),) if corrector else ()
        if order == 2 and not corrector:
            return (np.float32(0.5),)
        lambdas, t = self._lambdas64, s0 + 1
        with np.errstate(all="ignore"):
            h = lambdas[t] - lambdas[s0]
            rks = [(lambdas[s0 - k] - lambdas[s0]) / h for k in range(1, order)]
            hh = -h if self.options["predict_x0"] else h
            h_phi_1 = np.float64(math.expm1(hh)) if np.isfinite(hh) else np.expm1(hh)
            h_phi_k = h_phi_1 / hh - 1.0
            b_h = hh if self.options["solver_type"] == "bh1" else h_phi_1
            b, factorial = [], 1
            for i in range(1, order + 1):
                b.append(h_phi_k * factorial / b_h)
                factorial *= i + 1
                h_phi_k = h_phi_k / hh - 1.0 / factorial
            columns = (*rks, np.float64(1.0))
            powers = [[np.float64(1.0)] * order, list(columns), [r * r for r in columns]][:order]
            if corrector:
                return tuple(solve_small(powers, b))
            return tuple(solve_small([row[:-1] for row in powers[:-1]], b[:-1]))

    @staticmethod
    def _apply(update: UniUpdate, x, m0, history: list, m_t=None):
        """``update`` on sample ``x``: ``history[k]`` is m_k (``history[0]`` is ``m0``), ``m_t`` the corrector's
        model output (None for the predictor)."""
        x_next = float(update.c_x) * x - float(update.c_m0) * m0
        terms = [float(rho) * ((history[k] - m0) / float(rk))
                 for k, (rho, rk) in enumerate(zip(update.rhos, update.rks), start=1)]
        if m_t is not None:
            terms.append(float(update.rhos[-1]) * (m_t - m0))
        if terms:
            total = terms[0]
            for term in terms[1:]:
                total = total + term
            x_next = x_next - float(update.c_b) * total
        return x_next

    def _convert(self, i: int, x, model_output):
        """``convert_model_output`` at step ``i``: the data prediction (``predict_x0``) or the noise prediction."""
        alpha, sigma = float(self._alpha[i]), float(self._sigma_t[i])
        prediction = self.options["prediction_type"]
        if self.options["predict_x0"]:
            if prediction == "epsilon":
                return (x - sigma * model_output) / alpha
            if prediction == "sample":
                return model_output
            if prediction == "flow_prediction":  # sigma_t is the flow sigma itself
                return x - sigma * model_output
            return alpha * x - sigma * model_output  # v_prediction
        if prediction == "epsilon":
            return model_output
        if prediction == "sample":
            return (x - alpha * model_output) / sigma
        return alpha * model_output + sigma * x  # v_prediction

    def calls(self, x, noise=None, first_step: int = 0) -> CallGenerator:
        """Yields one call per step (the predictor's sample), receives the model output (guided; learned sigma split
        off or not), returns the latents as ``output_type="latent"``. ``noise`` is unused (deterministic)."""
        outputs = []  # the converted model outputs, most recent first
        last = None  # the sample the previous step's predictor started from
        for i in range(first_step, self.num_calls):
            out = yield ModelCall(i, x, float(self.timesteps[i]))
            converted = self._convert(i, x, self._output(x, out))
            if last is not None and i - 1 not in self.options["disable_corrector"]:
                order = min(int(self.orders[i - 1]), i - first_step)
                x = self._apply(self._update(i - 1, order, True), last, outputs[0], outputs, m_t=converted)
            outputs = [converted, *outputs][: self.options["solver_order"]]
            order = min(int(self.orders[i]), i - first_step + 1)
            last = x
            x = self._apply(self._update(i, order, False), x, outputs[0], outputs)
        return x

    def noise_level(self, call: int) -> tuple[float, float]:
        return float(self._alpha[call]), float(self._sigma_t[call])

    def to_dict(self) -> dict:
        return {**self._header(), "sigmas": self.sigmas.tolist(), "final_sigma": self.final_sigma,
                "orders": self.orders.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "DiffusersUniPC":
        options, steps, timesteps = _section_header(data, cls.kind, UNIPC_OPTIONS, cls.class_name)
        _check_flow_options(options, "sampler", prefix="options/")
        if options["prediction_type"] == "flow_prediction" and not options["predict_x0"]:
            raise SchedulerConfigError("sampler: field 'options/predict_x0' is false with prediction_type "
                                       "'flow_prediction'; expected true")
        final = data.get("final_sigma")
        if not (_is_number(final) and final >= 0):
            raise SchedulerConfigError(f"sampler: field 'final_sigma' is {final!r}; expected a finite number >= 0")
        return cls(options, steps, timesteps, _table(data, "sigmas", len(timesteps), 0.0, math.inf, low_open=True),
                   final, _table(data, "orders", len(timesteps), 1, 3, integer=True))
