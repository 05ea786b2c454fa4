// A dense float32 tensor in row-major order, and the .npy files the command reads and writes.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace l2c {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;  // row-major, size() == product of shape

  Tensor() = default;
  explicit Tensor(std::vector<int64_t> shape_, float fill = 0.0f);
  static size_t count(const std::vector<int64_t>& shape);
  size_t size() const { return data.size(); }
  std::string shape_string() const;
};

// "(2, 1, 8, 8)", as numpy prints shapes.
std::string shape_string(const std::vector<int64_t>& shape);

// Reads a float32 (little-endian, C order) .npy array; other dtypes, Fortran order and pickles are refused with an
// error naming the file.
Tensor read_npy(const std::filesystem::path& path);

// Writes `tensor` as a float32 .npy file atomically (a temporary file renamed over `path`).
void write_npy(const std::filesystem::path& path, const Tensor& tensor);

// Writes `bytes` to `path` atomically: nothing half-written is ever left at `path`.
void atomic_write(const std::filesystem::path& path, const std::string& bytes);

}  // namespace l2c
