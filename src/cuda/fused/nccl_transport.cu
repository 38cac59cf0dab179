// src/cuda/fused/nccl_transport.cu — the NCCL transport (fusedmoe/transport.hpp,
// nccl_transport.hpp).
//
// libnccl is opened with dlopen when the transport is first used: fusedmoe must load and run
// (local and emulated ranks) on machines without NCCL, and must not pin the process to one
// libnccl build. The device side (ncclGetLsaPointer) is header-only.
#include <dlfcn.h>
#include <nccl.h>
#include <nccl_device.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "cuda/common.cuh"
#include "cuda/fused/nccl_transport.hpp"
#include "fusedmoe/error.hpp"
#include "fusedmoe/layout.hpp"
#include "fusedmoe/transport.hpp"

namespace fusedmoe {
namespace cuda::fused {
namespace {

struct Nccl {
  void* handle = nullptr;
  ncclResult_t (*GetVersion)(int*) = nullptr;
  ncclResult_t (*GetUniqueId)(ncclUniqueId*) = nullptr;
  ncclResult_t (*CommInitRank)(ncclComm_t*, int, ncclUniqueId, int) = nullptr;
  ncclResult_t (*CommDestroy)(ncclComm_t) = nullptr;
  ncclResult_t (*MemAlloc)(void**, size_t) = nullptr;
  ncclResult_t (*MemFree)(void*) = nullptr;
  ncclResult_t (*CommWindowRegister)(ncclComm_t, void*, size_t, ncclWindow_t*, int) = nullptr;
  ncclResult_t (*CommWindowDeregister)(ncclComm_t, ncclWindow_t) = nullptr;
  ncclResult_t (*AllReduce)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t,
                            cudaStream_t) = nullptr;
  ncclTeam_t (*TeamLsa)(ncclComm_t) = nullptr;
  ncclResult_t (*DevCommCreate)(ncclComm_t, const ncclDevCommRequirements_t*, ncclDevComm_t*) = nullptr;
  ncclResult_t (*DevCommDestroy)(ncclComm_t, const ncclDevComm_t*) = nullptr;
  const char* (*GetErrorString)(ncclResult_t) = nullptr;
};

template <class F>
void bind(void* handle, F& f, const char* name) {
  f = reinterpret_cast<F>(dlsym(handle, name));
  FUSEDMOE_CHECK(f != nullptr, "NCCL transport: libnccl has no " << name << " (needs NCCL 2.28 or newer)");
}

const Nccl& nccl() {
  static std::once_flag once;
  static Nccl lib;
  static std::string failure;
  std::call_once(once, [] {
    // FUSEDMOE_NCCL_LIBRARY first, then a libnccl the process already has (torch's), then the
    // loader's search path.
    const char* env = std::getenv("FUSEDMOE_NCCL_LIBRARY");
    if (env && env[0]) lib.handle = dlopen(env, RTLD_NOW | RTLD_LOCAL);
    if (!lib.handle && !(env && env[0])) {
      lib.handle = dlopen("libnccl.so.2", RTLD_NOW | RTLD_NOLOAD);
      if (!lib.handle) lib.handle = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    }
    if (!lib.handle) {
      failure = "NCCL transport: libnccl.so.2 could not be loaded (set FUSEDMOE_NCCL_LIBRARY to its path)";
      return;
    }
    try {
      bind(lib.handle, lib.GetVersion, "ncclGetVersion");
      bind(lib.handle, lib.GetUniqueId, "ncclGetUniqueId");
      bind(lib.handle, lib.CommInitRank, "ncclCommInitRank");
      bind(lib.handle, lib.CommDestroy, "ncclCommDestroy");
      bind(lib.handle, lib.MemAlloc, "ncclMemAlloc");
      bind(lib.handle, lib.MemFree, "ncclMemFree");
      bind(lib.handle, lib.CommWindowRegister, "ncclCommWindowRegister");
      bind(lib.handle, lib.CommWindowDeregister, "ncclCommWindowDeregister");
      bind(lib.handle, lib.AllReduce, "ncclAllReduce");
      bind(lib.handle, lib.TeamLsa, "ncclTeamLsa");
      bind(lib.handle, lib.DevCommCreate, "ncclDevCommCreate");
      bind(lib.handle, lib.DevCommDestroy, "ncclDevCommDestroy");
      bind(lib.handle, lib.GetErrorString, "ncclGetErrorString");
    } catch (const Error& e) {
      failure = e.what();
      lib.handle = nullptr;
    }
  });
  FUSEDMOE_CHECK(lib.handle != nullptr, failure);
  return lib;
}

#define FUSEDMOE_NCCL_CHECK(call)                                                                  \
  do {                                                                                             \
    const ncclResult_t result_ = (call);                                                           \
    FUSEDMOE_CHECK(result_ == ncclSuccess, "NCCL transport: " #call " failed: " << ::fusedmoe::cuda::fused::nccl().GetErrorString(result_)); \
  } while (0)

struct Transport {
  std::mutex mutex;
  ncclComm_t comm = nullptr;
  int world = 1, rank = 0;
  uint64_t generation = 0;
  int* scratch = nullptr;  // one int on the device (barrier)
  // World ranks [lsa_begin, lsa_end) share this rank's node (LSA team); gin: not all of them.
  bool gin = false;
  int lsa_begin = 0, lsa_end = 1;
};
Transport& transport() {
  static auto* t = new Transport();  // never destroyed (the CUDA runtime may be gone at exit)
  return *t;
}

// The heap of LSA peer i (index in the LSA team) as mapped on this GPU, for every i.
__global__ void lsa_pointers(ncclWindow_t window, int lsa_size, uintptr_t* out) {
  for (int i = threadIdx.x; i < lsa_size; i += blockDim.x)
    out[i] = reinterpret_cast<uintptr_t>(ncclGetLsaPointer(window, 0, i));
}

}  // namespace

TransportState transport_state() {
  Transport& t = transport();
  std::lock_guard<std::mutex> lock(t.mutex);
  return TransportState{t.comm != nullptr, t.world, t.rank, t.gin};
}

uint64_t transport_generation() {
  Transport& t = transport();
  std::lock_guard<std::mutex> lock(t.mutex);
  return t.generation;
}

void nccl_barrier(cudaStream_t stream) {
  Transport& t = transport();
  FUSEDMOE_CHECK(t.comm != nullptr, "NCCL transport: not initialised");
  FUSEDMOE_NCCL_CHECK(nccl().AllReduce(t.scratch, t.scratch, 1, ncclInt32, ncclSum, t.comm, stream));
  FUSEDMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void nccl_free_heaps(SharedHeaps& heaps) {
  Transport& t = transport();
  if (heaps.gin && t.comm) FUSEDMOE_NCCL_CHECK(nccl().DevCommDestroy(t.comm, &heaps.dev_comm));
  if (heaps.window && t.comm) FUSEDMOE_NCCL_CHECK(nccl().CommWindowDeregister(t.comm, static_cast<ncclWindow_t>(heaps.window)));
  if (heaps.local) FUSEDMOE_NCCL_CHECK(nccl().MemFree(heaps.local));
  heaps = SharedHeaps{};
}

void nccl_allocate_heaps(SharedHeaps& heaps, size_t bytes, cudaStream_t stream) {
  Transport& t = transport();
  FUSEDMOE_CHECK(t.comm != nullptr, "NCCL transport: not initialised");
  FUSEDMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  nccl_free_heaps(heaps);
  bytes = (bytes + NCCL_WIN_REQUIRED_ALIGNMENT - 1) / NCCL_WIN_REQUIRED_ALIGNMENT * NCCL_WIN_REQUIRED_ALIGNMENT;
  void* local = nullptr;
  FUSEDMOE_NCCL_CHECK(nccl().MemAlloc(&local, bytes));
  heaps.local = static_cast<unsigned char*>(local);
  heaps.bytes = bytes;
  ncclWindow_t window = nullptr;
  FUSEDMOE_NCCL_CHECK(nccl().CommWindowRegister(t.comm, local, bytes, &window, NCCL_WIN_COLL_SYMMETRIC));
  heaps.window = window;
  FUSEDMOE_CUDA_CHECK(cudaMemsetAsync(local, 0, bytes, stream));

  const int lsa_size = t.lsa_end - t.lsa_begin;
  uintptr_t* d_ptrs = nullptr;
  FUSEDMOE_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&d_ptrs), sizeof(uintptr_t) * lsa_size, stream));
  lsa_pointers<<<1, 64, 0, stream>>>(window, lsa_size, d_ptrs);
  FUSEDMOE_CUDA_CHECK(cudaGetLastError());
  std::vector<uintptr_t> ptrs(static_cast<size_t>(lsa_size));
  FUSEDMOE_CUDA_CHECK(cudaMemcpyAsync(ptrs.data(), d_ptrs, sizeof(uintptr_t) * lsa_size, cudaMemcpyDeviceToHost, stream));
  FUSEDMOE_CUDA_CHECK(cudaFreeAsync(d_ptrs, stream));
  FUSEDMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  const int64_t stride = lsa_size > 1 ? static_cast<int64_t>(ptrs[1] - ptrs[0]) : static_cast<int64_t>(bytes);
  for (int i = 0; i < lsa_size; ++i)
    FUSEDMOE_CHECK(ptrs[static_cast<size_t>(i)] == ptrs[0] + static_cast<uintptr_t>(i) * static_cast<uintptr_t>(stride),
                   "NCCL transport: the window's peer mappings are not evenly spaced (LSA peer " << i << ")");
  FUSEDMOE_CHECK(ptrs[static_cast<size_t>(t.rank - t.lsa_begin)] != 0, "NCCL transport: no LSA mapping of this rank's heap");
  // World rank q of the team at base + q * stride (the team's first rank is lsa_begin).
  heaps.base = reinterpret_cast<unsigned char*>(ptrs[0] - static_cast<uintptr_t>(t.lsa_begin) * static_cast<uintptr_t>(stride));
  heaps.stride = stride;
  heaps.gin = t.gin;
  heaps.lsa_begin = t.lsa_begin;
  heaps.lsa_end = t.lsa_end;
  if (t.gin) {
    // One GIN context carries every put and signal (gin_link.cuh); the signals of every
    // (writer, slot) of the layout (WorkspaceLayout::gin_signal_count). A device communicator
    // per window: its signals start at zero with the zeroed heap (and its gin_sent records).
    ncclDevCommRequirements reqs;
    std::memset(&reqs, 0, sizeof(reqs));
    reqs.ginContextCount = 1;
    reqs.ginSignalCount = static_cast<int>(WorkspaceLayout::gin_signal_count(t.world));
    const ncclResult_t created = nccl().DevCommCreate(t.comm, &reqs, &heaps.dev_comm);
    FUSEDMOE_CHECK(created == ncclSuccess,
                   "NCCL transport: ranks " << t.lsa_begin << ".." << t.lsa_end - 1 << " of " << t.world
                   << " share this node and the others need GIN (GPU-initiated networking), but ncclDevCommCreate "
                   "with GIN signals failed: " << nccl().GetErrorString(created)
                   << " (a GIN-capable network and NCCL 2.28 or newer are needed)");
  }
  nccl_barrier(stream);  // every rank's heap is zeroed before any kernel writes into a peer's
}

}  // namespace cuda::fused

NcclUniqueId nccl_unique_id() {
  static_assert(sizeof(ncclUniqueId) == sizeof(NcclUniqueId::bytes));
  ncclUniqueId id;
  FUSEDMOE_NCCL_CHECK(cuda::fused::nccl().GetUniqueId(&id));
  NcclUniqueId out;
  std::memcpy(out.bytes.data(), &id, sizeof(id));
  return out;
}

void use_local_transport() {
  auto& t = cuda::fused::transport();
  std::lock_guard<std::mutex> lock(t.mutex);
  if (t.comm == nullptr) return;
  FUSEDMOE_CUDA_CHECK(cudaDeviceSynchronize());
  cuda::fused::release_nccl_heaps();
  cuda::fused::nccl().CommDestroy(t.comm);
  if (t.scratch) cudaFree(t.scratch);
  t.comm = nullptr;
  t.scratch = nullptr;
  t.world = 1;
  t.rank = 0;
  t.gin = false;
  t.lsa_begin = 0;
  t.lsa_end = 1;
  ++t.generation;
}

void use_nccl_transport(const NcclUniqueId& id, int world, int rank) {
  FUSEDMOE_CHECK(world >= 1 && rank >= 0 && rank < world,
                 "use_nccl_transport: rank " << rank << " of world " << world << " is out of range");
  use_local_transport();
  auto& t = cuda::fused::transport();
  const auto& lib = cuda::fused::nccl();
  int version = 0;
  FUSEDMOE_NCCL_CHECK(lib.GetVersion(&version));
  // The device side (ncclGetLsaPointer) reads NCCL's window structure as laid out by the headers
  // fusedmoe was built with, so the library must not be older than those headers.
  FUSEDMOE_CHECK(version >= NCCL_VERSION_CODE, "NCCL transport: the loaded libnccl is version " << version
                 << ", older than the NCCL headers fusedmoe was built with (" << NCCL_VERSION_CODE
                 << "); point FUSEDMOE_NCCL_LIBRARY at a libnccl.so.2 of that version or newer");
  std::lock_guard<std::mutex> lock(t.mutex);
  ncclUniqueId nid;
  std::memcpy(&nid, id.bytes.data(), sizeof(nid));
  ncclComm_t comm = nullptr;
  FUSEDMOE_NCCL_CHECK(lib.CommInitRank(&comm, world, nid, rank));
  const ncclTeam_t lsa = lib.TeamLsa(comm);
  // Ranks outside the LSA team (other nodes) are reached through GIN; FUSEDMOE_NCCL_GIN=0
  // refuses such a world instead.
  const char* gin_env = std::getenv("FUSEDMOE_NCCL_GIN");
  const bool gin_allowed = !(gin_env && gin_env[0] == '0');
  // The kernel takes teams as [i * size, (i + 1) * size): consecutive ranks, equal nodes.
  const bool aligned_teams = lsa.stride == 1 && world % lsa.nRanks == 0 && (rank - lsa.rank) % lsa.nRanks == 0;
  if (lsa.nRanks != world && (!gin_allowed || !aligned_teams)) {
    lib.CommDestroy(comm);
    FUSEDMOE_CHECK(false, "NCCL transport: only " << lsa.nRanks << " of the " << world
                   << " ranks are load/store accessible from rank " << rank << " (one node, NVLink or P2P)"
                   << (gin_allowed ? " and the nodes are not equal blocks of consecutive ranks"
                                   : " and FUSEDMOE_NCCL_GIN=0 refuses GIN"));
  }
  FUSEDMOE_CUDA_CHECK(cudaMalloc(&t.scratch, sizeof(int)));
  FUSEDMOE_CUDA_CHECK(cudaMemset(t.scratch, 0, sizeof(int)));
  t.comm = comm;
  t.world = world;
  t.rank = rank;
  t.gin = lsa.nRanks != world;
  t.lsa_begin = rank - lsa.rank;
  t.lsa_end = t.lsa_begin + lsa.nRanks;
  ++t.generation;
}

TransportInfo fused_transport() {
  const auto s = cuda::fused::transport_state();
  return TransportInfo{s.nccl, s.world, s.rank};
}

}  // namespace fusedmoe
