// fusedmoe/macros.hpp — portability macros shared by host and device code.
#pragma once

#if defined(__CUDACC__)
#define FUSEDMOE_HD __host__ __device__ __forceinline__
#else
#define FUSEDMOE_HD inline
#endif
