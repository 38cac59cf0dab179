// cli/device_memory_none.cpp — device_memory.hpp for builds without CUDA: nothing is usable.
#include "device_memory.hpp"
#include "fusedmoe/error.hpp"

namespace fusedmoe::cli::device {

namespace {
[[noreturn]] void no_cuda() {
  throw Error("device memory: this build of the fusedmoe command has no CUDA runtime");
}
}  // namespace

bool built_with_cuda() { return false; }
void* allocate(size_t) { no_cuda(); }
void release(void*) noexcept {}
void copy_to_device(void*, const void*, size_t) { no_cuda(); }
void copy_to_host(void*, const void*, size_t) { no_cuda(); }
void synchronize() { no_cuda(); }
int select_device(int) { no_cuda(); }

}  // namespace fusedmoe::cli::device
