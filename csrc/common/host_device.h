// Marks a function callable from both host and CUDA device code; empty for a plain C++ compiler.
#pragma once

#if defined(__CUDACC__)
#define PG4_HOST_DEVICE __host__ __device__
#else
#define PG4_HOST_DEVICE
#endif
