// torch.randn on the CPU for a torch.Generator().manual_seed(seed), bit for bit: the same steps as
// l2c_export/samplers/torch_noise.py (which says what torch does and why), in scalar float32. The library is built
// with -ffp-contract=off, so the fused multiply-adds of torch's GCC-compiled avx_mathfun.h are written out as
// std::fmaf (rounded once) and every other operation rounds on its own, as the vector instructions do.
#include "l2c/torch_noise.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>

namespace l2c {
namespace {

uint32_t bits_of(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

// torch writes avx_mathfun.h's constants as double literals in float arrays: rounded twice, from decimal to
// double to float, which a float literal (rounded once) need not equal
constexpr float as_float(double x) { return static_cast<float>(x); }

constexpr double kPi = 3.14159265358979323846;  // c10::pi<double>

float float_of(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

float uniform(std::mt19937& engine) {  // at::uniform_real_distribution<float>(0, 1)
  return static_cast<float>(engine() & ((1u << 24) - 1)) * (1.0f / 16777216.0f);
}

// avx_mathfun.h log256_ps for x in (0, 1]
float log_avx2(float x) {
  x = std::fmax(x, float_of(0x00800000u));
  const int32_t exponent = static_cast<int32_t>(bits_of(x) >> 23) - 0x7f;
  x = float_of((bits_of(x) & 0x807fffffu) | 0x3f000000u);
  float e = static_cast<float>(exponent) + 1.0f;
  const bool below = x < as_float(0.707106781186547524);
  const float shift = below ? x : 0.0f;
  x = x - 1.0f;
  e = e - (below ? 1.0f : 0.0f);
  x = x + shift;
  const float z = x * x;
  static const float polynomial[] = {-as_float(1.1514610310E-1), as_float(1.1676998740E-1), -as_float(1.2420140846E-1),
                                     as_float(1.4249322787E-1),  -as_float(1.6668057665E-1), as_float(2.0000714765E-1),
                                     -as_float(2.4999993993E-1), as_float(3.3333331174E-1)};
  float y = as_float(7.0376836292E-2);
  for (const float coefficient : polynomial) y = std::fmaf(y, x, coefficient);
  y = y * x;
  y = std::fmaf(y, z, e * -as_float(2.12194440e-4));
  y = std::fmaf(-z, 0.5f, y);
  x = x + y;
  return std::fmaf(e, as_float(0.693359375), x);
}

// avx_mathfun.h sincos256_ps for x >= 0
void sincos_avx2(float x, float& sin_out, float& cos_out) {
  uint32_t sign_sin = bits_of(x) & 0x80000000u;
  x = float_of(bits_of(x) & 0x7fffffffu);
  // truncation toward zero, as cvttps
  uint32_t octant = static_cast<uint32_t>(static_cast<int32_t>(x * as_float(1.27323954473516)));
  octant = (octant + 1) & ~1u;
  const float y = static_cast<float>(static_cast<int32_t>(octant));
  sign_sin ^= (octant & 4u) << 29;
  const bool sine_polynomial = (octant & 2u) == 0;
  const uint32_t sign_cos = (~(octant - 2u) & 4u) << 29;
  x = std::fmaf(y, -as_float(0.78515625), x);
  x = std::fmaf(y, -as_float(2.4187564849853515625e-4), x);
  x = std::fmaf(y, -as_float(3.77489497744594108e-8), x);
  const float z = x * x;
  float cosine = std::fmaf(as_float(2.443315711809948E-005), z, -as_float(1.388731625493765E-003));
  cosine = std::fmaf(cosine, z, as_float(4.166664568298827E-002));
  cosine = cosine * z;
  cosine = std::fmaf(cosine, z, -(z * 0.5f));
  cosine = cosine + 1.0f;
  float sine = std::fmaf(-as_float(1.9515295891E-4), z, as_float(8.3321608736E-3));
  sine = std::fmaf(sine, z, -as_float(1.6666654611E-1));
  sine = sine * z;
  sine = std::fmaf(sine, x, x);
  const float sin_from_sine = sine_polynomial ? sine : 0.0f;
  const float sin_from_cosine = sine_polynomial ? 0.0f : cosine;
  const float sin = sin_from_cosine + sin_from_sine;
  const float cos = (cosine - sin_from_cosine) + (sine - sin_from_sine);
  sin_out = float_of(bits_of(sin) ^ sign_sin);
  cos_out = float_of(bits_of(cos) ^ sign_cos);
}

// torch's AVX2 NormalFill16 (mean 0, std 1) on 16 uniforms, in place
void box_muller_16(float* data) {
  for (int j = 0; j < 8; ++j) {
    const float radius = std::sqrt(-2.0f * log_avx2(1.0f - data[j]));
    float sin, cos;
    sincos_avx2(static_cast<float>(2.0 * kPi) * data[j + 8], sin, cos);
    data[j] = radius * cos + 0.0f;  // + 0: the kernel's fmadd(n, 1, 0), which turns -0.0 into +0.0
    data[j + 8] = radius * sin + 0.0f;
  }
}

// torch's scalar NormalFill16 (AVX512, DEFAULT, aarch64), in place
void box_muller_16_scalar(float* data) {
  for (int j = 0; j < 8; ++j) {
    const float radius = std::sqrt(-2.0f * std::log(1.0f - data[j]));
    const float theta = static_cast<float>(2.0 * kPi * static_cast<double>(data[j + 8]));
    data[j] = radius * std::cos(theta) + 0.0f;
    data[j + 8] = radius * std::sin(theta) + 0.0f;
  }
}

}  // namespace

Tensor torch_randn(uint64_t seed, const std::vector<int64_t>& shape, NoiseKernel kernel) {
  Tensor out(shape);
  const size_t count = out.size();
  std::mt19937 engine(static_cast<uint32_t>(seed));  // torch's mt19937 seeds from the low 32 bits, as std's
  float* data = out.data.data();
  if (count < 16) {  // at::normal_distribution<double>, its cached second sample included
    auto uniform53 = [&engine]() {
      const uint64_t high = engine(), low = engine();
      return static_cast<double>(((high << 32) | low) & ((uint64_t{1} << 53) - 1)) * (1.0 / 9007199254740992.0);
    };
    for (size_t i = 0; i < count; i += 2) {
      const double u1 = uniform53(), u2 = uniform53();
      const double radius = std::sqrt(-2.0 * std::log1p(-u2));
      const double theta = 2.0 * kPi * u1;
      data[i] = static_cast<float>(radius * std::cos(theta));
      if (i + 1 < count) data[i + 1] = static_cast<float>(radius * std::sin(theta));
    }
    return out;
  }
  void (*const box_muller)(float*) = kernel == NoiseKernel::Scalar ? box_muller_16_scalar : box_muller_16;
  for (size_t i = 0; i < count; ++i) data[i] = uniform(engine);
  for (size_t i = 0; i + 16 <= count; i += 16) box_muller(data + i);
  if (count % 16 != 0) {
    float* tail = data + count - 16;
    for (int i = 0; i < 16; ++i) tail[i] = uniform(engine);
    box_muller(tail);
  }
  return out;
}

Tensor initial_noise(uint64_t seed, int64_t n, const std::vector<int64_t>& sample_shape) {
  std::vector<int64_t> shape = sample_shape;
  shape.insert(shape.begin(), n);
  if (sample_shape.size() != 2 || sample_shape[1] % 4 != 0 || sample_shape[0] <= 0) return torch_randn(seed, shape);
  const int64_t tokens = sample_shape[0], channels = sample_shape[1] / 4;
  int64_t half = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(tokens))));
  if (half * half != tokens) return torch_randn(seed, shape);
  const int64_t side = 2 * half;
  const Tensor unpacked = torch_randn(seed, {n, channels, side, side});
  Tensor packed(shape);
  // FluxPipeline._pack_latents: token (i, j) holds the 2x2 patch at rows 2i, 2i + 1 and columns 2j, 2j + 1,
  // channel-major (channel, row, column), as l2c_export/core/latents.py's pack_latents
  for (int64_t b = 0; b < n; ++b)
    for (int64_t i = 0; i < half; ++i)
      for (int64_t j = 0; j < half; ++j)
        for (int64_t c = 0; c < channels; ++c)
          for (int64_t di = 0; di < 2; ++di)
            for (int64_t dj = 0; dj < 2; ++dj)
              packed.data[((b * tokens + i * half + j) * channels + c) * 4 + di * 2 + dj] =
                  unpacked.data[((b * channels + c) * side + 2 * i + di) * side + 2 * j + dj];
  return packed;
}

}  // namespace l2c
