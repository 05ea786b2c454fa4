#pragma once

#include <stdexcept>
#include <string>

namespace l2c {

// Anything that stops a build from loading or a request from running: a manifest, file, tensor or argument that
// cannot be used. The message is one line that names the file or argument, the field, and what was expected.
// l2c-run exits with status 2 on it.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// What was asked for is not on this machine: the ONNX Runtime library, or an execution provider's libraries or
// device (TensorRT without an NVIDIA GPU). l2c-run exits with status 3 on it.
class UnavailableError : public Error {
 public:
  using Error::Error;
};

// The file system refused to take an output (disk full, read-only, permission denied); nothing half-written is left.
// l2c-run exits with status 4 on it.
class FileSystemError : public Error {
 public:
  using Error::Error;
};

}  // namespace l2c
