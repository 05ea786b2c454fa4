// The initial noise diffusers draws for a seed: torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
// reproduced without torch, bit for bit (torch's AVX2 CPU kernel), as l2c_export/samplers/torch_noise.py does in numpy.
#pragma once

#include <cstdint>
#include <vector>

#include "l2c/tensor.hpp"

namespace l2c {

// float32 standard normals of `shape` equal to torch's for manual_seed(seed) (a negative seed is given as its
// two's-complement uint64, as torch takes it): a whole (n, ...) batch in one draw, as diffusers' randn_tensor.
Tensor torch_randn(uint64_t seed, const std::vector<int64_t>& shape);

}  // namespace l2c
