"""``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`` in numpy, bit for bit.

diffusers draws a pipeline's initial latents with ``randn_tensor(shape, generator=g, device="cpu",
dtype=torch.float32)``, that is one ``torch.randn`` of the whole (n, ...) batch. So that ``seed=s`` gives the image
diffusers gives for ``generator=torch.Generator().manual_seed(s)``, the runtime (which must not need torch) draws the
same float32 values, and so does the C++ runtime (``cpp/src/torch_noise.cpp``, the same operations in the same order).
Written by hand, because the only other way to these values is importing torch.

What torch does on the CPU (ATen/native/cpu/DistributionTemplates.h, ``normal_kernel``), reproduced here:

* The generator is an MT19937 seeded with the low 32 bits of the seed, as ``std::mt19937`` (and numpy's
  ``MT19937._legacy_seeding``) seeds it; ``manual_seed`` accepts -2**63 .. 2**64 - 1 (a negative seed is taken
  modulo 2**64).
* numel >= 16 (``normal_fill``): every element gets ``uniform = (u32 & (2**24 - 1)) * 2**-24`` from one 32-bit draw;
  then each whole block of 16 becomes Box-Muller normals (u1 = 1 - d[0:8], u2 = d[8:16], radius = sqrt(-2 log u1),
  theta = 2 pi u2; d[0:8] = radius cos theta, d[8:16] = radius sin theta); when numel % 16 != 0, the LAST 16 elements
  are drawn again from 16 fresh uniforms and transformed the same way (so the rows of an (n, ...) draw depend on n).
  With the AVX2 CPU capability (``torch.backends.cpu.get_cpu_capability()``, the usual x86-64 one), log, sin and cos
  are ``log256_ps`` and ``sincos256_ps`` of avx_mathfun.h (Cephes polynomials in float32), compiled by GCC, which fuses
  each multiply feeding an add into one FMA: :func:`_log_avx2` and :func:`_sincos_avx2` repeat them operation by
  operation, with the FMAs rounded once (:func:`_fma`).
* numel < 16: ``at::normal_distribution<double>`` element by element: two 53-bit uniforms from two 64-bit draws
  (each two 32-bit draws, high word first), Box-Muller in double with ``log1p``, the sine half kept for the next
  element; each value rounded to float32.

Other CPU capabilities run another kernel for numel >= 16: the ``AVX512`` and ``DEFAULT`` ones
(``ATEN_CPU_CAPABILITY=default``, a CPU without AVX2) and aarch64 take the scalar ``NormalFill16``, float32
``std::log``/``std::cos``/``std::sin`` of the C library, theta rounded from double (``kernel="scalar"``: the same
steps, calling the C library's ``logf``/``cosf``/``sinf``, so bit for bit where torch uses that C library, as on
glibc Linux; one call per value, so slower); POWER (VSX) uses Sleef's, not reproduced. The two kernels' values differ
in the last bits (4 in 10 values, by up to 2e-6 on a 1 x 4 x 128 x 128 draw), so the default, ``"avx2"``, the usual
x86-64 one, matches elsewhere to that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from collections.abc import Sequence

import numpy as np

SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts

_f32 = np.float32
_MANTISSA_24 = np.uint32((1 << 24) - 1)


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int if ``torch.Generator().manual_seed`` accepts it, else a ValueError naming ``name``."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{name} {seed!r} is a {type(seed).__name__}; expected an integer")
    if not SEED_RANGE[0] <= int(seed) <= SEED_RANGE[1]:
        raise ValueError(f"{name} {seed} is out of range; expected an integer in -2**63..2**64-1 (what "
                         f"torch.Generator.manual_seed accepts)")
    return int(seed)


def generator_seed(generator, name: str = "generator") -> int:
    """The seed of a ``torch.Generator`` (what diffusers pipelines take as ``generator``), read without importing
    torch: ``generator.initial_seed()``. The noise :func:`torch_randn` draws for that seed is the generator's own only
    while nothing has been drawn from it since it was seeded: a generator that has drawn (its ``get_state()`` is not
    that of a new generator given the same seed) is refused, as is one on another device than the CPU (CUDA draws
    other numbers altogether) and anything without ``initial_seed`` (an int: pass it as ``seed``)."""
    initial_seed = getattr(generator, "initial_seed", None)
    if not callable(initial_seed):
        if isinstance(generator, (int, np.integer)) and not isinstance(generator, (bool, np.bool_)):
            raise ValueError(f"{name} is the integer {generator}; expected a torch.Generator (pass seed={generator} "
                             f"instead)")
        raise ValueError(f"{name} is a {type(generator).__name__}; expected a torch.Generator seeded with "
                         f"manual_seed (or pass seed=S)")
    device = getattr(getattr(generator, "device", None), "type", "cpu")
    if device != "cpu":
        raise ValueError(f"{name} is on {device}; expected a CPU generator (torch.Generator().manual_seed(S)): a "
                         f"generator on {device} draws other numbers, which are not reproduced")
    seed = check_seed(initial_seed(), name)
    try:  # duck-typed: a new generator of the same type, seeded alike, has the state of an unused one
        fresh = type(generator)()
        fresh.manual_seed(seed)
        used = not bool(fresh.get_state().equal(generator.get_state()))
    except Exception:  # not torch's Generator after all: its seed is all there is to read
        used = False
    if used:
        raise ValueError(f"{name} has drawn numbers since it was seeded with {seed}; expected a freshly seeded "
                         f"generator (torch.Generator().manual_seed({seed})), or pass seed={seed}")
    return seed


def _mt19937(seed: int) -> np.random.MT19937:
    generator = np.random.MT19937(0)
    generator._legacy_seeding(seed % 2 ** 64 & 0xFFFFFFFF)  # std::mt19937's seeding of the low 32 bits, as torch's
    return generator


def _uniforms(generator: np.random.MT19937, count: int) -> np.ndarray:
    """(count,) float32 in [0, 1): torch's ``uniform_real_distribution<float>(0, 1)``, one 32-bit draw each."""
    draws = generator.random_raw(count).astype(np.uint32)
    return (draws & _MANTISSA_24).astype(_f32) * _f32(2.0 ** -24)


def _fma(a, b, c) -> np.ndarray:
    """float32 ``a * b + c`` rounded once, as an FMA instruction: the product is exact in float64; the float64 sum is
    rounded to odd (its error recovered by TwoSum), so that rounding it to float32 is the one correct rounding."""
    product = np.asarray(a, _f32).astype(np.float64) * np.asarray(b, _f32).astype(np.float64)
    addend = np.asarray(c, _f32).astype(np.float64)
    total = product + addend
    virtual = total - product
    error = (product - (total - virtual)) + (addend - virtual)
    inexact_even = (error != 0) & ((total.view(np.uint64) & np.uint64(1)) == 0)
    total = np.where(inexact_even, np.nextafter(total, np.where(error > 0, np.inf, -np.inf)), total)
    return total.astype(_f32)


def _as_bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32)


def _as_floats(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.uint32).view(_f32)


_LOG_POLYNOMIAL = (7.0376836292E-2, -1.1514610310E-1, 1.1676998740E-1, -1.2420140846E-1, 1.4249322787E-1,
                   -1.6668057665E-1, 2.0000714765E-1, -2.4999993993E-1, 3.3333331174E-1)


def _log_avx2(x: np.ndarray) -> np.ndarray:
    """avx_mathfun.h ``log256_ps`` for float32 x in (0, 1] (torch's u1): exponent and mantissa in [0.5, 1), then a
    Cephes polynomial."""
    x = np.maximum(x, _as_floats(np.array(0x00800000)))
    exponent = (_as_bits(x) >> 23).astype(np.int32) - 0x7F
    x = _as_floats((_as_bits(x) & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000))
    e = exponent.astype(_f32) + _f32(1)
    below = x < _f32(0.707106781186547524)
    shift = np.where(below, x, _f32(0))
    x = x - _f32(1)
    e = e - np.where(below, _f32(1), _f32(0))
    x = x + shift
    z = x * x
    y = np.full_like(x, _f32(_LOG_POLYNOMIAL[0]))
    for coefficient in _LOG_POLYNOMIAL[1:]:
        y = _fma(y, x, _f32(coefficient))
    y = y * x
    y = _fma(y, z, e * _f32(-2.12194440e-4))
    y = _fma(-z, _f32(0.5), y)
    x = x + y
    return _fma(e, _f32(0.693359375), x)


def _sincos_avx2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun.h ``sincos256_ps`` for float32 x >= 0 (torch's theta in [0, 2 pi)): (sin x, cos x)."""
    sign_sin = _as_bits(x) & np.uint32(0x80000000)
    x = _as_floats(_as_bits(x) & np.uint32(0x7FFFFFFF))
    octant = (x * _f32(1.27323954473516)).astype(np.int32)  # truncation, as cvttps
    octant = ((octant + 1) & ~1).astype(np.uint32)
    y = octant.astype(np.int32).astype(_f32)
    sign_sin = sign_sin ^ ((octant & np.uint32(4)) << np.uint32(29))
    sine_polynomial = (octant & np.uint32(2)) == 0
    sign_cos = (~(octant - np.uint32(2)) & np.uint32(4)) << np.uint32(29)
    x = _fma(y, _f32(-0.78515625), x)  # x - y pi/4 in three parts (Cephes' extended precision)
    x = _fma(y, _f32(-2.4187564849853515625e-4), x)
    x = _fma(y, _f32(-3.77489497744594108e-8), x)
    z = x * x
    cosine = _fma(np.full_like(z, _f32(2.443315711809948E-005)), z, _f32(-1.388731625493765E-003))
    cosine = _fma(cosine, z, _f32(4.166664568298827E-002))
    cosine = cosine * z
    cosine = _fma(cosine, z, -(z * _f32(0.5)))
    cosine = cosine + _f32(1)
    sine = _fma(np.full_like(z, _f32(-1.9515295891E-4)), z, _f32(8.3321608736E-3))
    sine = _fma(sine, z, _f32(-1.6666654611E-1))
    sine = sine * z
    sine = _fma(sine, x, x)
    sin_from_sine = np.where(sine_polynomial, sine, _f32(0))
    sin_from_cosine = np.where(sine_polynomial, _f32(0), cosine)
    sin = sin_from_cosine + sin_from_sine
    cos = (cosine - sin_from_cosine) + (sine - sin_from_sine)
    return _as_floats(_as_bits(sin) ^ sign_sin), _as_floats(_as_bits(cos) ^ sign_cos)


def _box_muller_16(uniforms: np.ndarray) -> np.ndarray:
    """(m, 16) uniforms -> (m, 16) normals: torch's AVX2 ``NormalFill16`` (mean 0, std 1)."""
    u1 = _f32(1) - uniforms[:, :8]
    radius = np.sqrt(_f32(-2) * _log_avx2(u1))
    sin, cos = _sincos_avx2(_f32(2.0 * math.pi) * uniforms[:, 8:])
    # + 0: the kernel's fmadd(n, std=1, mean=0), which turns -0.0 into +0.0
    return np.concatenate([radius * cos + _f32(0), radius * sin + _f32(0)], axis=1)


@functools.cache
def _c_library_functions():
    library = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    functions = []
    for name in ("logf", "cosf", "sinf"):
        function = getattr(library, name)
        function.restype, function.argtypes = ctypes.c_float, [ctypes.c_float]
        functions.append(np.frompyfunc(function, 1, 1))
    return functions


def _box_muller_16_scalar(uniforms: np.ndarray) -> np.ndarray:
    """(m, 16) uniforms -> (m, 16) normals: torch's scalar ``NormalFill16`` (float32 log, cos and sin of the C
    library; theta = 2 pi u2 in double, rounded to float32)."""
    logf, cosf, sinf = _c_library_functions()
    u1 = _f32(1) - uniforms[:, :8]
    radius = np.sqrt(_f32(-2) * logf(u1).astype(_f32))
    theta = (2.0 * math.pi * uniforms[:, 8:].astype(np.float64)).astype(_f32)
    return np.concatenate([radius * cosf(theta).astype(_f32) + _f32(0), radius * sinf(theta).astype(_f32) + _f32(0)],
                          axis=1)


KERNELS = {"avx2": _box_muller_16, "scalar": _box_muller_16_scalar}


def _small_randn(generator: np.random.MT19937, count: int) -> np.ndarray:
    """numel < 16: ``at::normal_distribution<double>`` per element, its cached second sample included."""
    values, cached = [], None
    for _ in range(count):
        if cached is not None:
            values.append(cached)
            cached = None
            continue
        words = [int(w) for w in generator.random_raw(4)]
        u1, u2 = (((high << 32 | low) & ((1 << 53) - 1)) * 2.0 ** -53
                  for high, low in (words[0:2], words[2:4]))
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        cached = radius * math.sin(theta)
        values.append(radius * math.cos(theta))
    return np.array(values, dtype=_f32)


def torch_randn(seed: int, shape: Sequence[int], kernel: str = "avx2") -> np.ndarray:
    """``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`` as a float32 array of ``shape``,
    bit for bit with torch's ``kernel``: "avx2" (x86-64 with AVX2, the default) or "scalar" (AVX-512, no AVX2,
    aarch64; see the module's docstring). Any shape: only numel matters."""
    seed = check_seed(seed)
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    box_muller_16 = KERNELS[kernel]
    shape = tuple(int(d) for d in shape)
    count = math.prod(shape)
    generator = _mt19937(seed)
    if count < 16:
        return _small_randn(generator, count).reshape(shape)
    values = _uniforms(generator, count)
    whole = count // 16 * 16
    values[:whole] = box_muller_16(values[:whole].reshape(-1, 16)).reshape(-1)
    if count % 16:
        values[count - 16:] = box_muller_16(_uniforms(generator, 16).reshape(1, 16)).reshape(-1)
    return values.reshape(shape)
