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
  // The number of elements of `shape`; l2c::Error for a negative dimension or a count size_t cannot hold.
  static size_t count(const std::vector<int64_t>& shape);
  size_t size() const { return data.size(); }
  std::string shape_string() const;
};

// "(2, 1, 8, 8)", as numpy prints shapes.
std::string shape_string(const std::vector<int64_t>& shape);

// Reads a float32 (little-endian, C order) .npy array; other dtypes, Fortran order, pickles, a header beyond numpy's
// 10000-byte limit and data that is not exactly as long as the shape says are refused with an l2c::Error naming the
// file, before anything is allocated for the data.
Tensor read_npy(const std::filesystem::path& path);

// Writes `tensor` as a float32 .npy file atomically (a temporary file renamed over `path`).
void write_npy(const std::filesystem::path& path, const Tensor& tensor);

// Writes `bytes` to `path` atomically: nothing half-written is ever left at `path`. l2c::FileSystemError when the
// file system refuses.
void atomic_write(const std::filesystem::path& path, const std::string& bytes);

}  // namespace l2c
