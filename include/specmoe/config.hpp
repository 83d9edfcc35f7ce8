// specmoe: speculative MoE and SP-MoE as policies of one generic MoE layer.
// config.hpp: version, feature switches and portability macros shared by every header.
#pragma once

#define SPECMOE_VERSION_MAJOR 0
#define SPECMOE_VERSION_MINOR 1
#define SPECMOE_VERSION_PATCH 0

/// Set to 1 by the `specmoe::cuda` CMake target (the CUDA runtime, cuBLAS and NCCL are linked).
#ifndef SPECMOE_HAS_CUDA
#define SPECMOE_HAS_CUDA 0
#endif

/// Set to 1 by the `specmoe::cuda` CMake target when NCCL was found.
#ifndef SPECMOE_HAS_NCCL
#define SPECMOE_HAS_NCCL 0
#endif

// Functions callable from host and device code when compiled by nvcc; plain functions otherwise.
#if defined(__CUDACC__)
#define SPECMOE_HOST_DEVICE __host__ __device__
#else
#define SPECMOE_HOST_DEVICE
#endif

namespace specmoe {
/// The library version as numbers, for run-time checks by users that load plugins.
struct version_info {
  int major, minor, patch;
};
inline constexpr version_info version{SPECMOE_VERSION_MAJOR, SPECMOE_VERSION_MINOR, SPECMOE_VERSION_PATCH};
}  // namespace specmoe
