// src/cuda/device.cu — device discovery for the CUDA backend, and a device-side self-check of
// the workspace layout (the same __host__ __device__ code the kernels address buffers with).
#include <cuda_runtime.h>

#include "core/backend.hpp"
#include "fusedmoe/layout.hpp"

namespace fusedmoe {

namespace {
__global__ void layout_probe_kernel(LayoutParams params, int64_t* out) {
  const WorkspaceLayout layout = WorkspaceLayout::make(params);
  out[0] = layout.total_bytes;
  out[1] = layout.recv_row(params.world_size - 1, params.max_local_experts - 1, 0, 0);
  out[2] = layout.ret_flag_index(params.num_experts - 1, layout.m_tiles - 1);
}
}  // namespace

bool cuda_device_present() {
  static const bool present = [] {  // asked on every layer construction: cache it
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  }();
  return present;
}

// Computes three layout values on the device (tests compare them with the host's).
bool layout_probe_on_device(const LayoutParams& params, int64_t out_host[3]) {
  int64_t* out = nullptr;
  if (cudaMalloc(&out, 3 * sizeof(int64_t)) != cudaSuccess) return false;
  layout_probe_kernel<<<1, 1>>>(params, out);
  const bool ok = cudaMemcpy(out_host, out, 3 * sizeof(int64_t), cudaMemcpyDeviceToHost) == cudaSuccess;
  cudaFree(out);
  return ok;
}

}  // namespace fusedmoe
