// src/core/no_cuda.cpp — the CUDA backend's entry points in a build without CUDA.
#include "core/backend.hpp"
#include "fusedmoe/error.hpp"
#include "fusedmoe/timeline.hpp"
#include "fusedmoe/transport.hpp"

namespace fusedmoe {

std::unique_ptr<BackendImpl> make_cuda_backend() { return nullptr; }
std::unique_ptr<BackendImpl> make_fused_backend() { return nullptr; }
bool cuda_device_present() { return false; }
void set_fused_timeline(bool) {}
std::vector<FusedEvent> fused_timeline(int* blocks) {
  if (blocks) *blocks = 0;
  return {};
}
NcclUniqueId nccl_unique_id() {
  FUSEDMOE_CHECK(false, "NCCL transport: this build of fusedmoe has no CUDA");
  return {};
}
void use_nccl_transport(const NcclUniqueId&, int, int) {
  FUSEDMOE_CHECK(false, "NCCL transport: this build of fusedmoe has no CUDA");
}
void use_local_transport() {}
TransportInfo fused_transport() { return {}; }

}  // namespace fusedmoe
