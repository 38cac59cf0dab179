// cli/device_memory_cuda.cpp — device_memory.hpp on the CUDA runtime API (plain C++, no nvcc).
#include <cuda_runtime_api.h>

#include <string>

#include "device_memory.hpp"
#include "fusedmoe/error.hpp"

namespace fusedmoe::cli::device {

namespace {
void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess)
    throw Error(std::string("device memory: ") + call + " failed: " + cudaGetErrorString(status));
}
}  // namespace

bool built_with_cuda() { return true; }

void* allocate(size_t bytes) {
  void* device_ptr = nullptr;
  check(cudaMalloc(&device_ptr, bytes), "cudaMalloc");
  return device_ptr;
}

void release(void* device_ptr) noexcept { cudaFree(device_ptr); }

void copy_to_device(void* device_dst, const void* host_src, size_t bytes) {
  check(cudaMemcpy(device_dst, host_src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
}

void copy_to_host(void* host_dst, const void* device_src, size_t bytes) {
  check(cudaMemcpy(host_dst, device_src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
}

void synchronize() { check(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

int select_device(int local_rank) {
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (count < 1) throw Error("device memory: no CUDA device");
  const int device = local_rank % count;
  check(cudaSetDevice(device), "cudaSetDevice");
  return device;
}

}  // namespace fusedmoe::cli::device
