// A dense float32 tensor in row-major order, and the .npy files the command reads and writes.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
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

// The .npy array in `bytes` (a file's or an .npz member's, named `name` in errors) with read_npy's checks, whose dtype
// is one of `accepted` (numpy's codes: "<f4", "<f8", "<i8", "<i4", "|b1"), converted to float32; `expected` says
// what was wanted in the error for another dtype.
Tensor parse_npy(const std::string& bytes, const std::string& name, const std::vector<std::string>& accepted,
                 const std::string& expected);

// The members of an .npz archive (numpy.savez or savez_compressed: a zip of .npy files) by array name (the member's
// name without ".npy"), each member's bytes checked against its CRC-32. l2c::Error naming the file for anything
// else: not a zip, a member that is not an .npy file, a compression other than stored or deflate, an encrypted or
// multi-disk archive, a member past the end.
std::map<std::string, std::string> read_npz(const std::filesystem::path& path);

// Writes `tensor` as a float32 .npy file atomically (a temporary file renamed over `path`).
void write_npy(const std::filesystem::path& path, const Tensor& tensor);

// Writes `bytes` to `path` atomically: nothing half-written is ever left at `path`. l2c::FileSystemError when the
// file system refuses.
void atomic_write(const std::filesystem::path& path, const std::string& bytes);

}  // namespace l2c
