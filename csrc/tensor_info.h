// at::Tensor -> rllc_fast::TensorInfo for the shared argument checks of csrc/arg_checks.h, and the
// throw that turns a failed check into a Python ValueError.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cctype>
#include <optional>
#include <string>

#include "arg_checks.h"

namespace rllc_fast {

// The dtype as Python prints it without "torch." (float32, not c10's "Float").
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    case at::kComplexHalf: return "complex32";
    default: {  // c10's other names are Python's with capitals (Float8_e4m3fn, UInt16, QInt8)
      std::string name = c10::toString(t);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return name;
    }
  }
}

inline TensorInfo tensor_info(const at::Tensor& t) {
  if (!t.defined()) return TensorInfo{};
  const bool unit_last = t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1;
  return TensorInfo{true, t.sizes().vec(), dtype_name(t.scalar_type()), t.device().str(), t.is_contiguous(), unit_last};
}

inline TensorInfo tensor_info(const std::optional<at::Tensor>& t) {
  return t.has_value() ? tensor_info(*t) : TensorInfo{};
}

// Throws `message` (when not empty) as c10::ValueError, which Python receives as ValueError. The error
// is built with an empty backtrace: the SourceLocation constructor behind TORCH_CHECK walks and records
// the whole C++ stack, and on the 2026-11-30 H200 run (torch 2.11) the first bad-argument call to a
// CUDA op ended the process with a segmentation fault instead of raising (issue 20).
inline void raise_value_error(const std::string& message) {
  if (!message.empty()) throw c10::ValueError(message, {});
}

}  // namespace rllc_fast
