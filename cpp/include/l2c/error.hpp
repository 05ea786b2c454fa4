#pragma once

#include <stdexcept>
#include <string>

namespace l2c {

// Anything that stops a build from loading or a request from running. The message is one line that names the file
// or argument, the field, and what was expected.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace l2c
