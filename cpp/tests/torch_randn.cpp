// l2c-torch-randn-test OUT_DIR: for each line "SEED D0 D1 ..." on stdin (SEED as a uint64), writes
// OUT_DIR/<line number>.npy, l2c::torch_randn(SEED, (D0, D1, ...)); tests/test_cpp.py compares them with numpy's and
// torch's draws.
#include <filesystem>
#include <iostream>
#include <sstream>
#include <string>

#include "l2c/torch_noise.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " OUT_DIR < lines of 'SEED D0 D1 ...'\n";
    return 2;
  }
  std::string line;
  for (int index = 0; std::getline(std::cin, line); ++index) {
    std::istringstream fields(line);
    uint64_t seed = 0;
    fields >> seed;
    std::vector<int64_t> shape;
    for (int64_t dim; fields >> dim;) shape.push_back(dim);
    l2c::write_npy(std::filesystem::path(argv[1]) / (std::to_string(index) + ".npy"), l2c::torch_randn(seed, shape));
  }
  return 0;
}
