// Typed reads of manifest fields: every value is checked (type, finite, range) and a bad one becomes one line that
// names the file and the field, as the Python reader's schema errors do. Internal to the library.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "l2c/error.hpp"

namespace l2c::detail {

using nlohmann::json;

class Fields {
 public:
  Fields(const json& node, std::string file, std::string field = "")
      : node_(node), file_(std::move(file)), field_(std::move(field)) {}

  Fields operator[](const std::string& key) const {
    std::string path = field_.empty() ? key : field_ + "/" + key;
    if (!node_.is_object()) fail(field_.empty() ? "(top level)" : field_, "expected an object");
    auto it = node_.find(key);
    if (it == node_.end()) fail(path, "is missing");
    return Fields(*it, file_, path);
  }
  Fields operator[](size_t i) const { return Fields(node_.at(i), file_, field_ + "/" + std::to_string(i)); }
  bool has(const std::string& key) const { return node_.is_object() && node_.contains(key); }
  bool is_string() const { return node_.is_string(); }
  bool is_boolean() const { return node_.is_boolean(); }
  bool is_integer() const { return node_.is_number_integer(); }
  bool is_null() const { return node_.is_null(); }

  size_t size() const {
    if (!node_.is_array()) fail(field_, "expected an array");
    return node_.size();
  }
  std::string str() const {
    if (!node_.is_string()) fail(field_, "expected a string");
    return node_.get<std::string>();
  }
  bool boolean() const {
    if (!node_.is_boolean()) fail(field_, "expected true or false");
    return node_.get<bool>();
  }
  int64_t integer(int64_t low = INT64_MIN, int64_t high = INT64_MAX) const {
    if (!node_.is_number_integer()) fail(field_, "expected an integer");
    int64_t value = node_.get<int64_t>();
    if (value < low || value > high)
      fail(field_, "is " + std::to_string(value) + "; expected " + range(std::to_string(low), std::to_string(high)));
    return value;
  }
  double number() const {
    if (!node_.is_number()) fail(field_, "expected a number");
    double value = node_.get<double>();
    if (!std::isfinite(value)) fail(field_, "expected a finite number");
    return value;
  }
  std::vector<double> numbers(size_t expected_size) const {
    if (size() != expected_size)
      fail(field_, "has " + std::to_string(size()) + " entries; expected " + std::to_string(expected_size));
    std::vector<double> values;
    for (size_t i = 0; i < expected_size; ++i) values.push_back((*this)[i].number());
    return values;
  }
  std::string field() const { return field_; }

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw Error(file_ + ": field '" + (field.empty() ? "(top level)" : field) + "' " + what);
  }
  [[noreturn]] void fail(const std::string& what) const { fail(field_, what); }

 private:
  static std::string range(const std::string& low, const std::string& high) {
    if (low == std::to_string(INT64_MIN)) return "at most " + high;
    if (high == std::to_string(INT64_MAX)) return "at least " + low;
    return low + ".." + high;
  }
  const json& node_;
  std::string file_, field_;
};

}  // namespace l2c::detail
