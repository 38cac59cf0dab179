// cli/buffer_space.hpp — where one backend's buffers live: the CLI's host buffers themselves
// (cpu and naive backends) or device copies of them (cuda backend, which computes on device
// pointers only). The run code is written once against this class; on the host every upload and
// download is a no-op.
#pragma once

#include <cstddef>
#include <map>

#include "fusedmoe/host_tensors.hpp"
#include "fusedmoe/moe_layer.hpp"

namespace fusedmoe::cli {

class BufferSpace {
 public:
  explicit BufferSpace(bool on_device) : on_device_(on_device) {}
  ~BufferSpace();  // frees the device copies
  BufferSpace(const BufferSpace&) = delete;
  BufferSpace& operator=(const BufferSpace&) = delete;

  bool on_device() const { return on_device_; }

  // The pointer the layer gets for the host buffer [host, host + bytes): host itself, or its
  // device copy (allocated on first use, contents undefined until upload). nullptr stays nullptr.
  void* place(void* host, size_t bytes);
  TensorView place(const HostTensor& tensor);  // an undefined tensor gives an undefined view
  // place() and upload() in one step, for inputs.
  TensorView stage(const HostTensor& tensor);
  MoeWeights stage(const HostWeights& weights);
  // The gradient views of `gradients` (shaped like weights) and dx, placed.
  MoeGrads place_gradients(const HostWeights& gradients, const HostTensor& dx);

  void upload(const void* host);  // host buffer → its device copy
  void download(void* host);      // device copy → host buffer
  void upload(const HostTensor& tensor) { upload(tensor.view().data); }
  void download(const HostTensor& tensor) { download(tensor.view().data); }
  void synchronize();  // waits for the device (no-op on the host)

 private:
  struct DeviceCopy {
    void* device_ptr = nullptr;
    size_t bytes = 0;
  };
  const bool on_device_;
  std::map<const void*, DeviceCopy> device_copies_;  // keyed by host pointer
};

}  // namespace fusedmoe::cli
