// ONNX Runtime's C++ API as the library uses it (dlopen'ed, ORT_API_MANUAL_INIT), and the process-wide environment
// pipeline.cpp sets up once. Internal to the library.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <string>

namespace l2c::detail {

// The environment every session of the process is made in (global intra-op thread pool, shared CPU arena), loading
// ONNX Runtime from `library` first where it is not loaded yet (l2c::init_onnxruntime).
Ort::Env& onnxruntime_env(const std::string& library, int threads);

}  // namespace l2c::detail
