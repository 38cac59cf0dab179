// src/core/no_cuda.cpp — the CUDA backend's entry points in a build without CUDA.
#include "core/backend.hpp"
#include "fusedmoe/timeline.hpp"

namespace fusedmoe {

std::unique_ptr<BackendImpl> make_cuda_backend() { return nullptr; }
std::unique_ptr<BackendImpl> make_fused_backend() { return nullptr; }
bool cuda_device_present() { return false; }
void set_fused_timeline(bool) {}
std::vector<FusedEvent> fused_timeline(int* blocks) {
  if (blocks) *blocks = 0;
  return {};
}

}  // namespace fusedmoe
