// src/cpu/tensor_io.hpp — typed access to TensorViews of the CPU backends (fp32 / fp64).
#pragma once

#include <cstdint>
#include <vector>

#include "fusedmoe/moe_layer.hpp"

namespace fusedmoe::cpu {

inline double load(const TensorView& v, int64_t i) {
  return v.dtype == DType::kFloat64 ? static_cast<const double*>(v.data)[i]
                                    : static_cast<double>(static_cast<const float*>(v.data)[i]);
}
inline void store(const TensorView& v, int64_t i, double value) {
  if (v.dtype == DType::kFloat64) static_cast<double*>(v.data)[i] = value;
  else static_cast<float*>(v.data)[i] = static_cast<float>(value);
}
inline std::vector<double> to_doubles(const TensorView& v) {
  std::vector<double> out(v.defined() ? static_cast<size_t>(v.numel()) : 0);
  for (size_t i = 0; i < out.size(); ++i) out[i] = load(v, static_cast<int64_t>(i));
  return out;
}
inline void store_all(const TensorView& v, const std::vector<double>& values) {
  if (!v.defined()) return;
  for (size_t i = 0; i < values.size(); ++i) store(v, static_cast<int64_t>(i), values[i]);
}
template <class T>
const T* typed(const TensorView& v) { return static_cast<const T*>(v.data); }
template <class T>
T* typed_mut(const TensorView& v) { return static_cast<T*>(v.data); }

}  // namespace fusedmoe::cpu
