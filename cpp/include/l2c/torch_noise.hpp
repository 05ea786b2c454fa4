// The initial noise diffusers draws for a seed: torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
// reproduced without torch, bit for bit (torch's AVX2 CPU kernel), as l2c_export/samplers/torch_noise.py does in numpy.
#pragma once

#include <cstdint>
#include <vector>

#include "l2c/tensor.hpp"

namespace l2c {

// Which of torch's CPU kernels to reproduce for 16 values or more: Avx2, x86-64 with AVX2 (the usual one); Scalar,
// torch's AVX512 and DEFAULT capabilities and aarch64 (float32 logf/cosf/sinf of the C library, so equal where torch
// uses the same one, as on glibc Linux). They differ in the last bits.
enum class NoiseKernel { Avx2, Scalar };

// float32 standard normals of `shape` equal to torch's for manual_seed(seed) (a negative seed is given as its
// two's-complement uint64, as torch takes it): a whole (n, ...) batch in one draw, as diffusers' randn_tensor.
Tensor torch_randn(uint64_t seed, const std::vector<int64_t>& shape, NoiseKernel kernel = NoiseKernel::Avx2);

// The initial latents a diffusers pipeline draws for n samples of `sample_shape` with manual_seed(seed), as the Python
// runtime's make_noise: torch_randn(seed, (n, ...sample_shape)), except FLUX.1's packed (T, 4 C) samples (T a square),
// which FluxPipeline draws as (n, C, h, w) square latents and packs 2x2 into (n, T, 4 C).
Tensor initial_noise(uint64_t seed, int64_t n, const std::vector<int64_t>& sample_shape);

}  // namespace l2c
