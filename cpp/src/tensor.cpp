// .npy I/O by hand: the format is one header line and raw data (numpy's format.py documents it), and no Debian
// package offers a reader that refuses what this one refuses.
#include "l2c/tensor.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <regex>

#include <zlib.h>
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

namespace {

// A value of numpy dtype `descr` (one of kNpyDtypes) at `at`, as float32 (numpy's astype(np.float32)).
float npy_value(const std::string& descr, const char* at) {
  if (descr == "<f4") { float v; std::memcpy(&v, at, 4); return v; }
  if (descr == "<f8") { double v; std::memcpy(&v, at, 8); return static_cast<float>(v); }
  if (descr == "<i8") { int64_t v; std::memcpy(&v, at, 8); return static_cast<float>(v); }
  if (descr == "<i4") { int32_t v; std::memcpy(&v, at, 4); return static_cast<float>(v); }
  return *at != 0 ? 1.0f : 0.0f;  // |b1
}

size_t npy_item_size(const std::string& descr) {
  return descr == "<f8" || descr == "<i8" ? 8 : descr == "<f4" || descr == "<i4" ? 4 : 1;
}

std::string dtype_name(const std::string& descr) {
  static const std::pair<const char*, const char*> names[] = {
      {"<f4", "float32"}, {"<f8", "float64"}, {"<i8", "int64"}, {"<i4", "int32"}, {"|b1", "bool"}};
  for (const auto& [code, name] : names)
    if (descr == code) return name;
  return descr;
}

}  // namespace

Tensor parse_npy(const std::string& bytes, const std::string& name, const std::vector<std::string>& accepted,
                 const std::string& expected) {
  // numpy's format: magic, version (1, 2 or 3), the header's length (2 bytes in version 1, else 4), the header (a
  // Python dict literal), the data.
  if (bytes.size() < 8 || std::memcmp(bytes.data(), "\x93NUMPY", 6) != 0 || bytes[6] < 1 || bytes[6] > 3)
    throw Error(name + ": not a .npy file (expected an array saved with numpy.save)");
  const size_t length_bytes = bytes[6] == 1 ? 2 : 4;
  if (bytes.size() < 8 + length_bytes) throw Error(name + ": truncated header");
  const auto* length = reinterpret_cast<const unsigned char*>(bytes.data() + 8);
  const size_t header_length =
      length[0] | (length[1] << 8) | (length_bytes == 4 ? (length[2] << 16) | (size_t(length[3]) << 24) : 0);
  if (header_length > kMaxNpyHeader)
    throw Error(name + ": header of " + std::to_string(header_length) + " bytes; expected at most " +
                std::to_string(kMaxNpyHeader) + " (numpy's own limit)");
  if (bytes.size() < 8 + length_bytes + header_length) throw Error(name + ": truncated header");
  const std::string header = bytes.substr(8 + length_bytes, header_length);
  std::smatch match;
  const bool has_descr = std::regex_search(header, match, std::regex("'descr':\\s*'([^']*)'"));
  const std::string descr = has_descr ? match[1].str() : "?";
  if (std::find(accepted.begin(), accepted.end(), descr) == accepted.end())
    throw Error(name + ": dtype " + descr + "; expected " + expected);
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
  // The data's size is checked against the bytes before anything is allocated for it.
  size_t count = 0;
  try {
    count = Tensor::count(tensor.shape);
  } catch (const Error& error) {
    throw Error(name + ": " + error.what());
  }
  const size_t item = npy_item_size(descr), data_offset = 8 + length_bytes + header_length;
  const size_t data_bytes = bytes.size() - data_offset;
  if (count > data_bytes / item || data_bytes != count * item)
    throw Error(name + ": holds " + std::to_string(data_bytes) + " bytes of data; its shape " +
                tensor.shape_string() + " says " + std::to_string(count) + " " + dtype_name(descr) + " values");
  tensor.data.resize(count);
  const char* data = bytes.data() + data_offset;
  if (descr == "<f4") {
    std::memcpy(tensor.data.data(), data, count * 4);
  } else {
    for (size_t i = 0; i < count; ++i) tensor.data[i] = npy_value(descr, data + i * item);
  }
  return tensor;
}

Tensor read_npy(const fs::path& path) {
  const std::string name = path.string();
  std::ifstream in(path, std::ios::binary);
  if (!in || !fs::is_regular_file(path)) throw Error(name + ": cannot be read");
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (!in && !in.eof()) throw Error(name + ": cannot be read");
  return parse_npy(bytes.str(), name, {"<f4"}, "float32 ('<f4')");
}

namespace {

uint32_t le32(const std::string& bytes, size_t at) {
  return static_cast<uint32_t>(static_cast<unsigned char>(bytes[at])) |
         static_cast<uint32_t>(static_cast<unsigned char>(bytes[at + 1])) << 8 |
         static_cast<uint32_t>(static_cast<unsigned char>(bytes[at + 2])) << 16 |
         static_cast<uint32_t>(static_cast<unsigned char>(bytes[at + 3])) << 24;
}
uint16_t le16(const std::string& bytes, size_t at) {
  return static_cast<uint16_t>(static_cast<unsigned char>(bytes[at]) |
                               static_cast<unsigned char>(bytes[at + 1]) << 8);
}
uint64_t le64(const std::string& bytes, size_t at) {
  return static_cast<uint64_t>(le32(bytes, at)) | static_cast<uint64_t>(le32(bytes, at + 4)) << 32;
}

constexpr uint64_t kMaxNpzMember = uint64_t(1) << 31;  // bytes of one member, uncompressed

}  // namespace

std::map<std::string, std::string> read_npz(const fs::path& path) {
  // The zip format (PKWARE's APPNOTE): the end-of-central-directory record at the end, the central directory it
  // points at (one entry per member: compression, CRC-32, sizes, the local header's offset), each member's local
  // header and data. np.savez writes its members stored with zip64 local extras; np.savez_compressed deflates them.
  const std::string name = path.string();
  std::ifstream in(path, std::ios::binary);
  if (!in || !fs::is_regular_file(path)) throw Error(name + ": cannot be read");
  std::ostringstream buffer;
  buffer << in.rdbuf();
  const std::string bytes = buffer.str();
  const auto fail = [&](const std::string& what) -> Error {
    return Error(name + ": " + what + " (expected an .npz archive written by numpy.savez)");
  };
  if (bytes.size() < 22) throw fail("not a zip archive");
  size_t end = std::string::npos;
  for (size_t at = bytes.size() - 22 + 1; at-- > 0 && bytes.size() - at <= 22 + 65535;)
    if (le32(bytes, at) == 0x06054b50) {
      end = at;
      break;
    }
  if (end == std::string::npos) throw fail("not a zip archive");
  const uint16_t entries = le16(bytes, end + 10);
  const uint64_t directory_size = le32(bytes, end + 12), directory = le32(bytes, end + 16);
  if (le16(bytes, end + 4) != 0 || le16(bytes, end + 6) != 0 || le16(bytes, end + 8) != entries)
    throw fail("a multi-disk zip archive");
  if (directory == 0xffffffffu || directory + directory_size > end) throw fail("a zip64 or damaged archive");
  std::map<std::string, std::string> members;
  size_t at = directory;
  for (uint16_t i = 0; i < entries; ++i) {
    if (at + 46 > end || le32(bytes, at) != 0x02014b50) throw fail("a damaged central directory");
    const uint16_t flags = le16(bytes, at + 8), method = le16(bytes, at + 10);
    const uint32_t crc = le32(bytes, at + 16);
    uint64_t packed = le32(bytes, at + 20), size = le32(bytes, at + 24), offset = le32(bytes, at + 42);
    const size_t name_length = le16(bytes, at + 28), extra_length = le16(bytes, at + 30),
                 comment_length = le16(bytes, at + 32);
    if (at + 46 + name_length + extra_length + comment_length > end) throw fail("a damaged central directory");
    const std::string member = bytes.substr(at + 46, name_length);
    // zip64: the sizes and offset that do not fit 32 bits are in the extra field 0x0001, in this order.
    for (size_t extra = at + 46 + name_length; extra + 4 <= at + 46 + name_length + extra_length;) {
      const uint16_t id = le16(bytes, extra), length = le16(bytes, extra + 2);
      size_t field = extra + 4;
      if (id == 1) {
        for (uint64_t* value : {&size, &packed, &offset})
          if (*value == 0xffffffffu && field + 8 <= extra + 4 + length) {
            *value = le64(bytes, field);
            field += 8;
          }
      }
      extra += 4 + length;
    }
    at += 46 + name_length + extra_length + comment_length;
    const std::string where = "member " + member;
    if (flags & 1) throw fail(where + " is encrypted");
    if (method != 0 && method != 8) throw fail(where + " uses compression method " + std::to_string(method) +
                                               "; expected stored (numpy.savez) or deflate (numpy.savez_compressed)");
    if (member.size() < 5 || member.compare(member.size() - 4, 4, ".npy") != 0)
      throw fail(where + " is not an .npy file");
    if (size > kMaxNpzMember) throw fail(where + " holds " + std::to_string(size) + " bytes; expected at most " +
                                         std::to_string(kMaxNpzMember));
    if (offset + 30 > bytes.size() || le32(bytes, offset) != 0x04034b50) throw fail(where + ": no local header");
    const uint64_t data = offset + 30 + le16(bytes, offset + 26) + le16(bytes, offset + 28);
    if (data > bytes.size() || packed > bytes.size() - data) throw fail(where + " reaches past the end");
    std::string content;
    if (method == 0) {
      if (packed != size) throw fail(where + " is stored with two different sizes");
      content = bytes.substr(data, packed);
    } else {
      content.assign(size, '\0');
      z_stream stream{};
      if (inflateInit2(&stream, -MAX_WBITS) != Z_OK) throw Error(name + ": zlib cannot start inflating");
      stream.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(bytes.data() + data));
      stream.avail_in = static_cast<uInt>(packed);
      stream.next_out = reinterpret_cast<Bytef*>(content.data());
      stream.avail_out = static_cast<uInt>(size);
      const int status = inflate(&stream, Z_FINISH);
      const uint64_t produced = stream.total_out;
      inflateEnd(&stream);
      if (status != Z_STREAM_END || produced != size) throw fail(where + " does not inflate to its recorded size");
    }
    if (crc32(0L, reinterpret_cast<const Bytef*>(content.data()), static_cast<uInt>(content.size())) != crc)
      throw fail(where + " fails its CRC-32 check");
    const std::string array = member.substr(0, member.size() - 4);
    if (members.count(array)) throw fail("member " + member + " appears twice");
    members.emplace(array, std::move(content));
  }
  return members;
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
