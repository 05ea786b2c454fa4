// .npy I/O by hand: the format is one header line and raw data (numpy's format.py documents it), and no Debian
// package offers a reader that refuses what this one refuses.
#include "l2c/tensor.hpp"

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>

#include "l2c/error.hpp"

namespace l2c {

namespace fs = std::filesystem;

namespace {
constexpr size_t kMaxNpyHeader = 10000;  // numpy.lib.format's max_header_size: a longer header is refused
}  // namespace

Tensor::Tensor(std::vector<int64_t> shape_, float fill) : shape(std::move(shape_)), data(count(shape), fill) {}

size_t Tensor::count(const std::vector<int64_t>& shape) {
  size_t total = 1;
  for (int64_t dim : shape) {
    if (dim < 0) throw Error("shape " + l2c::shape_string(shape) + " has a negative dimension");
    if (dim != 0 && total > SIZE_MAX / static_cast<size_t>(dim))
      throw Error("shape " + l2c::shape_string(shape) + " has more elements than this machine can address");
    total *= static_cast<size_t>(dim);
  }
  return total;
}

std::string Tensor::shape_string() const { return l2c::shape_string(shape); }

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

Tensor read_npy(const fs::path& path) {
  const std::string name = path.string();
  std::error_code size_error;
  const uintmax_t file_bytes = fs::file_size(path, size_error);
  std::ifstream in(path, std::ios::binary);
  if (!in || size_error) throw Error(name + ": cannot be read");
  // numpy's format: magic, version (1, 2 or 3), the header's length (2 bytes in version 1, else 4), the header (a
  // Python dict literal), the data.
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0 || magic[6] < 1 || magic[6] > 3)
    throw Error(name + ": not a .npy file (expected a float32 array saved with numpy.save)");
  unsigned char length[4] = {0, 0, 0, 0};
  const int length_bytes = magic[6] == 1 ? 2 : 4;
  if (!in.read(reinterpret_cast<char*>(length), length_bytes)) throw Error(name + ": truncated header");
  const size_t header_length = length[0] | (length[1] << 8) | (length[2] << 16) | (size_t(length[3]) << 24);
  if (header_length > kMaxNpyHeader)
    throw Error(name + ": header of " + std::to_string(header_length) + " bytes; expected at most " +
                std::to_string(kMaxNpyHeader) + " (numpy's own limit)");
  std::string header(header_length, '\0');
  if (!in.read(header.data(), static_cast<std::streamsize>(header_length))) throw Error(name + ": truncated header");
  std::smatch match;
  if (!std::regex_search(header, match, std::regex("'descr':\\s*'([^']*)'")) || match[1] != "<f4")
    throw Error(name + ": dtype " + (match.size() > 1 ? match[1].str() : "?") + "; expected float32 ('<f4')");
  if (!std::regex_search(header, match, std::regex("'fortran_order':\\s*(True|False)")) || match[1] != "False")
    throw Error(name + ": Fortran order; expected a C-order array");
  if (!std::regex_search(header, match, std::regex("'shape':\\s*\\(([^)]*)\\)")) ||
      !std::regex_match(match[1].str(), std::regex("\\s*([0-9]{1,18}\\s*,\\s*)*([0-9]{1,18}\\s*,?\\s*)?")))
    throw Error(name + ": header has no shape of non-negative integers");
  Tensor tensor;
  const std::string dims = match[1];
  const std::regex number("[0-9]+");
  for (auto it = std::sregex_iterator(dims.begin(), dims.end(), number); it != std::sregex_iterator(); ++it)
    tensor.shape.push_back(std::stoll(it->str()));
  // The data's size is checked against the file before anything is allocated for it.
  size_t count = 0;
  try {
    count = Tensor::count(tensor.shape);
  } catch (const Error& error) {
    throw Error(name + ": " + error.what());
  }
  const uintmax_t data_offset = 8 + length_bytes + header_length;
  const uintmax_t data_bytes = file_bytes > data_offset ? file_bytes - data_offset : 0;
  if (count > data_bytes / 4 || data_bytes != count * 4)
    throw Error(name + ": holds " + std::to_string(data_bytes) + " bytes of data; its shape " +
                tensor.shape_string() + " says " + std::to_string(count) + " float32 values");
  tensor.data.resize(count);
  if (!in.read(reinterpret_cast<char*>(tensor.data.data()), static_cast<std::streamsize>(count * 4)))
    throw Error(name + ": holds fewer values than its shape " + tensor.shape_string() + " says");
  return tensor;
}

void atomic_write(const fs::path& path, const std::string& bytes) {
  fs::path temporary = path;
  temporary += ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    if (!out) throw FileSystemError(path.string() + ": cannot be written (does its folder exist?)");
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out) {
      out.close();
      fs::remove(temporary);
      throw FileSystemError(path.string() + ": writing failed (disk full?)");
    }
  }
  std::error_code error;
  fs::rename(temporary, path, error);
  if (error) {
    fs::remove(temporary);
    throw FileSystemError(path.string() + ": cannot be written (" + error.message() + ")");
  }
}

void write_npy(const fs::path& path, const Tensor& tensor) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + tensor.shape_string() + ", }";
  const size_t unpadded = 10 + header.size() + 1;  // magic, version, length, header, newline
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  std::string bytes("\x93NUMPY\x01\x00", 8);
  bytes.push_back(static_cast<char>(header.size() & 0xff));
  bytes.push_back(static_cast<char>(header.size() >> 8));
  bytes += header;
  bytes.append(reinterpret_cast<const char*>(tensor.data.data()), tensor.size() * sizeof(float));
  atomic_write(path, bytes);
}

}  // namespace l2c
