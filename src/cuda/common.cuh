// src/cuda/common.cuh — CUDA helpers shared by the GPU stages: the API-call check (throws
// fusedmoe::Error with file:line and the CUDA error), element conversion to and from fp32, warp
// reductions, and a stream-ordered scratch allocator.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "fusedmoe/error.hpp"

#define FUSEDMOE_CUDA_CHECK(call)                                                             \
  do {                                                                                        \
    cudaError_t fusedmoe_status_ = (call);                                                    \
    FUSEDMOE_CHECK(fusedmoe_status_ == cudaSuccess,                                           \
                   #call << " failed: " << cudaGetErrorName(fusedmoe_status_) << " ("         \
                         << cudaGetErrorString(fusedmoe_status_) << ")");                     \
  } while (0)

// After a launch: a bad configuration surfaces here, not at the next synchronisation.
#define FUSEDMOE_LAUNCH_CHECK() FUSEDMOE_CUDA_CHECK(cudaGetLastError())

namespace fusedmoe::cuda {

template <class T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

template <class T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The memory pool of the scratch buffers of `device`: a pool of its own whose release threshold
// is unlimited, so memory freed at the end of a call is kept for the next one instead of being
// unmapped at every synchronisation (the default pool's threshold is 0, which made each call
// re-map its scratch: ~1 ms on paper-64).
inline cudaMemPool_t scratch_pool(int device) {
  constexpr int kMaxDevices = 64;
  static cudaMemPool_t pools[kMaxDevices] = {};
  FUSEDMOE_CHECK(device >= 0 && device < kMaxDevices, "device " << device << ": at most " << kMaxDevices << " devices");
  static std::once_flag once[kMaxDevices];
  std::call_once(once[device], [device] {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    FUSEDMOE_CUDA_CHECK(cudaMemPoolCreate(&pools[device], &props));
    uint64_t keep_all = UINT64_MAX;
    FUSEDMOE_CUDA_CHECK(cudaMemPoolSetAttribute(pools[device], cudaMemPoolAttrReleaseThreshold, &keep_all));
  });
  return pools[device];
}

// Facts of a device the backends ask before launches, queried once per device (each
// attribute query costs driver time on the call's critical path).
struct DeviceFacts {
  bool sm90 = false;  // an sm_90 (Hopper) GPU
  int sms = 0;        // multiprocessors
  int major = 0, minor = 0;  // compute capability
};
inline const DeviceFacts& device_facts(int device) {
  constexpr int kMaxDevices = 64;
  static DeviceFacts facts[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  FUSEDMOE_CHECK(device >= 0 && device < kMaxDevices, "device " << device << ": at most " << kMaxDevices << " devices");
  std::call_once(once[device], [device] {
    int major = 0, minor = 0, sms = 0;
    FUSEDMOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    FUSEDMOE_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    FUSEDMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    facts[device] = DeviceFacts{.sm90 = major == 9 && minor == 0, .sms = sms, .major = major, .minor = minor};
  });
  return facts[device];
}
inline bool device_is_sm90(int device) { return device_facts(device).sm90; }

// Stream-ordered scratch buffers from scratch_pool, freed in order at destruction. Capturable in
// CUDA graphs (allocations become graph memory nodes). Requests up to kSmallBytes share slabs of
// kSlabBytes (256-B aligned pieces): a forward makes ~20 small requests (routing tables, counts,
// offsets), and each pool allocation and free costs about a microsecond of host time on the
// call's critical path.
class Scratch {
 public:
  static constexpr size_t kSmallBytes = size_t(64) << 10;
  static constexpr size_t kSlabBytes = size_t(1) << 20;

  explicit Scratch(cudaStream_t stream) : stream_(stream) {
    int device = 0;
    FUSEDMOE_CUDA_CHECK(cudaGetDevice(&device));
    pool_ = scratch_pool(device);
  }
  ~Scratch() {
    for (void* p : blocks_) cudaFreeAsync(p, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  template <class T>
  T* alloc(int64_t count) {
    const size_t bytes = static_cast<size_t>(count > 0 ? count : 1) * sizeof(T);
    if (bytes > kSmallBytes) return static_cast<T*>(allocate(bytes));
    const size_t rounded = (bytes + 255) & ~size_t(255);
    if (slab_ == nullptr || slab_used_ + rounded > kSlabBytes) {
      slab_ = static_cast<unsigned char*>(allocate(kSlabBytes));
      slab_used_ = 0;
    }
    void* p = slab_ + slab_used_;
    slab_used_ += rounded;
    return static_cast<T*>(p);
  }
  template <class T>
  T* zeros(int64_t count) {
    T* p = alloc<T>(count);
    FUSEDMOE_CUDA_CHECK(cudaMemsetAsync(p, 0, static_cast<size_t>(count > 0 ? count : 1) * sizeof(T), stream_));
    return p;
  }

 private:
  void* allocate(size_t bytes) {
    void* p = nullptr;
    FUSEDMOE_CUDA_CHECK(cudaMallocFromPoolAsync(&p, bytes, pool_, stream_));
    blocks_.push_back(p);
    return p;
  }

  unsigned char* slab_ = nullptr;
  size_t slab_used_ = 0;
  cudaStream_t stream_;
  cudaMemPool_t pool_ = nullptr;
  std::vector<void*> blocks_;
};

}  // namespace fusedmoe::cuda
