// A grid PNG of images (n, C, H, W) in [-1, 1], C = 1 or 3, laid out as l2c_export/core/images.py save_grid lays it
// out (white, 2 px gaps, `columns` a row) and enlarged as it enlarges them: Pillow's bicubic resize of the 8-bit
// images (Resample.c: coefficients in double, 22-bit fixed point, horizontal pass then vertical, each clipped to 8
// bits), so the same images give the same pixels. Encoded by libpng (its simplified API).
#pragma once

#include <png.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "l2c/components.hpp"
#include "l2c/error.hpp"
#include "l2c/tensor.hpp"

namespace l2c_run {

// Pillow's resampling coefficients of one axis (precompute_coeffs + normalize_coeffs_8bpc, bicubic a = -0.5):
// per output position its first input position, count and fixed-point weights.
struct Coefficients {
  int size = 0;  // weights per output position
  std::vector<int> first, count;
  std::vector<int32_t> weights;
};

inline Coefficients bicubic_coefficients(int in_size, int out_size) {
  constexpr int kPrecisionBits = 32 - 8 - 2;
  auto filter = [](double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
  };
  const double scale = static_cast<double>(static_cast<float>(in_size)) / out_size;
  const double filterscale = std::max(scale, 1.0), support = 2.0 * filterscale;
  Coefficients c;
  c.size = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.weights.assign(static_cast<size_t>(out_size) * c.size, 0);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale, ss = 1.0 / filterscale;
    const int xmin = std::max(static_cast<int>(center - support + 0.5), 0);
    const int xmax = std::min(static_cast<int>(center + support + 0.5), in_size) - xmin;
    std::vector<double> k(c.size, 0.0);
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) ww += k[x] = filter((x + xmin - center + 0.5) * ss);
    for (int x = 0; x < xmax; ++x) {
      if (ww != 0.0) k[x] /= ww;
      c.weights[static_cast<size_t>(xx) * c.size + x] =
          static_cast<int32_t>(k[x] < 0 ? -0.5 + k[x] * (1 << kPrecisionBits) : 0.5 + k[x] * (1 << kPrecisionBits));
    }
    c.first.push_back(xmin);
    c.count.push_back(xmax);
  }
  return c;
}

inline uint8_t clip8(int32_t value) { return static_cast<uint8_t>(std::clamp(value >> (32 - 8 - 2), 0, 255)); }

// One (h, w, c) 8-bit image resized to (out_h, out_w) as Pillow's Image.resize(..., BICUBIC) does (the same size:
// a copy).
inline std::vector<uint8_t> resize_bicubic(const uint8_t* image, int h, int w, int c, int out_h, int out_w) {
  if (h == out_h && w == out_w) return std::vector<uint8_t>(image, image + static_cast<size_t>(h) * w * c);
  const Coefficients across = bicubic_coefficients(w, out_w), down = bicubic_coefficients(h, out_h);
  const int first_row = down.first[0], last_row = down.first[out_h - 1] + down.count[out_h - 1];
  const int rows = last_row - first_row;
  const int32_t half = 1 << (32 - 8 - 2 - 1);
  std::vector<uint8_t> wide(static_cast<size_t>(rows) * out_w * c), out(static_cast<size_t>(out_h) * out_w * c);
  for (int y = 0; y < rows; ++y)  // horizontal pass over the rows the vertical pass reads
    for (int xx = 0; xx < out_w; ++xx)
      for (int ch = 0; ch < c; ++ch) {
        int32_t sum = half;
        for (int x = 0; x < across.count[xx]; ++x)
          sum += image[(static_cast<size_t>(y + first_row) * w + across.first[xx] + x) * c + ch] *
                 across.weights[static_cast<size_t>(xx) * across.size + x];
        wide[(static_cast<size_t>(y) * out_w + xx) * c + ch] = clip8(sum);
      }
  for (int yy = 0; yy < out_h; ++yy)
    for (int xx = 0; xx < out_w; ++xx)
      for (int ch = 0; ch < c; ++ch) {
        int32_t sum = half;
        for (int y = 0; y < down.count[yy]; ++y)
          sum += wide[(static_cast<size_t>(down.first[yy] - first_row + y) * out_w + xx) * c + ch] *
                 down.weights[static_cast<size_t>(yy) * down.size + y];
        out[(static_cast<size_t>(yy) * out_w + xx) * c + ch] = clip8(sum);
      }
  return out;
}

inline void write_png_grid(const std::filesystem::path& path, const l2c::Tensor& images, int scale = 8) {
  const int64_t n = images.shape[0], c = images.shape[1], h = images.shape[2], w = images.shape[3];
  if (c != 1 && c != 3)
    throw l2c::Error(path.string() + ": a PNG needs 1 or 3 channels; the images have " + std::to_string(c));
  const std::vector<uint8_t> bytes = l2c::to_uint8(images);  // (n, h, w, c)
  const int64_t columns = std::min<int64_t>(n, 10), rows = (n + columns - 1) / columns, pad = 2;
  const int64_t big_h = h * scale, big_w = w * scale;
  const int64_t width = columns * (big_w + pad) + pad, height = rows * (big_h + pad) + pad;
  std::vector<uint8_t> grid(static_cast<size_t>(width * height * c), 255);
  for (int64_t i = 0; i < n; ++i) {
    const std::vector<uint8_t> big = resize_bicubic(bytes.data() + i * h * w * c, static_cast<int>(h),
                                                    static_cast<int>(w), static_cast<int>(c), static_cast<int>(big_h),
                                                    static_cast<int>(big_w));
    const int64_t top = pad + (i / columns) * (big_h + pad), left = pad + (i % columns) * (big_w + pad);
    for (int64_t y = 0; y < big_h; ++y)
      std::copy_n(big.begin() + y * big_w * c, big_w * c, grid.begin() + ((top + y) * width + left) * c);
  }
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  image.width = static_cast<png_uint_32>(width);
  image.height = static_cast<png_uint_32>(height);
  image.format = c == 1 ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB;
  png_alloc_size_t size = 0;
  if (!png_image_write_get_memory_size(image, size, 0, grid.data(), 0, nullptr))
    throw l2c::Error(path.string() + ": libpng cannot encode the image (" + image.message + ")");
  std::string png(size, '\0');
  if (!png_image_write_to_memory(&image, png.data(), &size, 0, grid.data(), 0, nullptr))
    throw l2c::Error(path.string() + ": libpng cannot encode the image (" + image.message + ")");
  png.resize(size);
  l2c::atomic_write(path, png);
}

}  // namespace l2c_run
