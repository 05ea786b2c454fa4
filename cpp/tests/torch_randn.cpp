// l2c-torch-randn-test OUT_DIR: for each line "SEED KERNEL D0 D1 ..." on stdin (SEED as a uint64, KERNEL avx2 or
// scalar), writes OUT_DIR/<line number>.npy, l2c::torch_randn(SEED, (D0, D1, ...), KERNEL); tests/test_cpp.py compares
// them with numpy's and torch's draws.
#include <filesystem>
#include <iostream>
#include <sstream>
#include <string>

#include "l2c/torch_noise.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " OUT_DIR < lines of 'SEED avx2|scalar D0 D1 ...'\n";
    return 2;
  }
  std::string line;
  for (int index = 0; std::getline(std::cin, line); ++index) {
    std::istringstream fields(line);
    uint64_t seed = 0;
    std::string kernel;
    fields >> seed >> kernel;
    std::vector<int64_t> shape;
    for (int64_t dim; fields >> dim;) shape.push_back(dim);
    const auto which = kernel == "scalar" ? l2c::NoiseKernel::Scalar : l2c::NoiseKernel::Avx2;
    const auto path = std::filesystem::path(argv[1]) / (std::to_string(index) + ".npy");
    l2c::write_npy(path, l2c::torch_randn(seed, shape, which));
  }
  return 0;
}
