// src/core/no_cuda.cpp — the CUDA backend's entry points in a build without CUDA.
#include "core/backend.hpp"

namespace fusedmoe {

std::unique_ptr<BackendImpl> make_cuda_backend() { return nullptr; }
std::unique_ptr<BackendImpl> make_fused_backend() { return nullptr; }
bool cuda_device_present() { return false; }

}  // namespace fusedmoe
