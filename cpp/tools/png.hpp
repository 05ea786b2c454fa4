// A grid PNG of pixel-space samples (n, C, H, W) in [-1, 1], C = 1 or 3, as l2c_export/core/images.py lays it out
// (nearest-neighbour upscaling here). Written with zlib: libpng's API is far larger than these 40 lines.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>

#include "l2c/error.hpp"
#include "l2c/tensor.hpp"

namespace l2c_run {

inline void put_chunk(std::string& png, const char* type, const std::string& data) {
  auto put32 = [&png](uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) png.push_back(static_cast<char>((v >> shift) & 0xff));
  };
  put32(static_cast<uint32_t>(data.size()));
  std::string body = std::string(type, 4) + data;
  png += body;
  put32(static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(body.data()), body.size())));
}

inline void write_png_grid(const std::filesystem::path& path, const l2c::Tensor& samples, int scale = 8) {
  const int64_t n = samples.shape[0], c = samples.shape[1], h = samples.shape[2], w = samples.shape[3];
  if (c != 1 && c != 3) throw l2c::Error(path.string() + ": a PNG needs 1 or 3 channels; the samples have " + std::to_string(c));
  const int64_t columns = std::min<int64_t>(n, 10), rows = (n + columns - 1) / columns, pad = 2;
  const int64_t width = columns * (w * scale + pad) + pad, height = rows * (h * scale + pad) + pad;
  std::string raw;  // one filter byte (0) then the row's pixels
  for (int64_t py = 0; py < height; ++py) {
    raw.push_back(0);
    for (int64_t px = 0; px < width; ++px) {
      const int64_t r = py / (h * scale + pad), q = px / (w * scale + pad);
      const int64_t y = py - pad - r * (h * scale + pad), x = px - pad - q * (w * scale + pad);
      const int64_t i = r * columns + q;
      for (int64_t ch = 0; ch < c; ++ch) {
        uint8_t value = 255;
        if (i < n && y >= 0 && y < h * scale && x >= 0 && x < w * scale) {
          float v = samples.data[((i * c + ch) * h + y / scale) * w + x / scale];
          if (std::isnan(v)) v = -1.0f;  // black; casting NaN to an integer is undefined
          value = static_cast<uint8_t>(std::clamp((v + 1.0f) * 127.5f + 0.5f, 0.0f, 255.0f));
        }
        raw.push_back(static_cast<char>(value));
      }
    }
  }
  uLongf packed_size = compressBound(raw.size());
  std::string packed(packed_size, '\0');
  compress2(reinterpret_cast<Bytef*>(packed.data()), &packed_size, reinterpret_cast<const Bytef*>(raw.data()),
            raw.size(), 6);
  packed.resize(packed_size);
  std::string header;
  for (uint32_t v : {static_cast<uint32_t>(width), static_cast<uint32_t>(height)})
    for (int shift = 24; shift >= 0; shift -= 8) header.push_back(static_cast<char>((v >> shift) & 0xff));
  header += std::string{8, static_cast<char>(c == 1 ? 0 : 2), 0, 0, 0};  // 8 bits, grey or RGB
  std::string png("\x89PNG\r\n\x1a\n", 8);
  put_chunk(png, "IHDR", header);
  put_chunk(png, "IDAT", packed);
  put_chunk(png, "IEND", "");
  l2c::atomic_write(path, png);
}

}  // namespace l2c_run
