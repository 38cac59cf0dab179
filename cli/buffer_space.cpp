// cli/buffer_space.cpp — see buffer_space.hpp.
#include "buffer_space.hpp"

#include <algorithm>

#include "device_memory.hpp"

namespace fusedmoe::cli {

namespace {
// A zero-byte buffer still gets a real allocation, so that its view counts as "given".
constexpr size_t kMinAllocationBytes = 16;

size_t tensor_bytes(const HostTensor& tensor) {
  return static_cast<size_t>(tensor.numel()) * dtype_size(tensor.dtype());
}
}  // namespace

BufferSpace::~BufferSpace() {
  for (auto& [host_ptr, copy] : device_copies_) device::release(copy.device_ptr);
}

void* BufferSpace::place(void* host, size_t bytes) {
  if (!on_device_ || host == nullptr) return host;
  auto found = device_copies_.find(host);
  if (found != device_copies_.end()) return found->second.device_ptr;
  DeviceCopy copy{.device_ptr = device::allocate(std::max(bytes, kMinAllocationBytes)),
                  .bytes = bytes};
  device_copies_.emplace(host, copy);
  return copy.device_ptr;
}

TensorView BufferSpace::place(const HostTensor& tensor) {
  TensorView view = tensor.view();
  if (view.defined()) view.data = place(view.data, tensor_bytes(tensor));
  return view;
}

TensorView BufferSpace::stage(const HostTensor& tensor) {
  TensorView view = place(tensor);
  upload(tensor);
  return view;
}

MoeWeights BufferSpace::stage(const HostWeights& weights) {
  return MoeWeights{.gate_weight = stage(weights.gate_weight),
                    .gate_bias = stage(weights.gate_bias),
                    .noise_weight = stage(weights.noise_weight),
                    .selection_bias = stage(weights.selection_bias),
                    .w1 = stage(weights.w1),
                    .b1 = stage(weights.b1),
                    .w2 = stage(weights.w2),
                    .b2 = stage(weights.b2),
                    .shared_w1 = stage(weights.shared_w1),
                    .shared_b1 = stage(weights.shared_b1),
                    .shared_w2 = stage(weights.shared_w2),
                    .shared_b2 = stage(weights.shared_b2)};
}

MoeGrads BufferSpace::place_gradients(const HostWeights& gradients, const HostTensor& dx) {
  return MoeGrads{.dx = place(dx),
                  .d_gate_weight = place(gradients.gate_weight),
                  .d_gate_bias = place(gradients.gate_bias),
                  .d_noise_weight = place(gradients.noise_weight),
                  .d_w1 = place(gradients.w1),
                  .d_b1 = place(gradients.b1),
                  .d_w2 = place(gradients.w2),
                  .d_b2 = place(gradients.b2),
                  .d_shared_w1 = place(gradients.shared_w1),
                  .d_shared_b1 = place(gradients.shared_b1),
                  .d_shared_w2 = place(gradients.shared_w2),
                  .d_shared_b2 = place(gradients.shared_b2)};
}

void BufferSpace::upload(const void* host) {
  if (!on_device_ || host == nullptr) return;
  auto found = device_copies_.find(host);
  if (found == device_copies_.end() || found->second.bytes == 0) return;
  device::copy_to_device(found->second.device_ptr, host, found->second.bytes);
}

void BufferSpace::download(void* host) {
  if (!on_device_ || host == nullptr) return;
  auto found = device_copies_.find(host);
  if (found == device_copies_.end() || found->second.bytes == 0) return;
  device::copy_to_host(host, found->second.device_ptr, found->second.bytes);
}

void BufferSpace::synchronize() {
  if (on_device_) device::synchronize();
}

}  // namespace fusedmoe::cli
