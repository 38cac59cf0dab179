// cli/device_memory.hpp — the few CUDA runtime calls the CLI needs to stage its host buffers in
// device memory for the cuda backend (which computes on device pointers only). Implemented by
// device_memory_cuda.cpp when fusedmoe is built with CUDA, by device_memory_none.cpp otherwise
// (every call then throws). Errors throw fusedmoe::Error naming the call and the CUDA error.
#pragma once

#include <cstddef>

namespace fusedmoe::cli::device {

bool built_with_cuda();
void* allocate(size_t bytes);
void release(void* device_ptr) noexcept;
void copy_to_device(void* device_dst, const void* host_src, size_t bytes);
void copy_to_host(void* host_dst, const void* device_src, size_t bytes);
void synchronize();  // waits for all work on the device (the layer runs on the default stream)
int select_device(int local_rank);  // device local_rank % count becomes current; returns it

}  // namespace fusedmoe::cli::device
