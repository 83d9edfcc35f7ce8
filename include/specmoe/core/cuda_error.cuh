// specmoe/core/cuda_error.cuh: the CUDA runtime check every nvcc-only part of specmoe uses (nvcc only).
#pragma once

#include <specmoe/core/error.hpp>

#include <cuda_runtime.h>

/// Throws specmoe::error{errc::cuda} naming the call when a CUDA runtime call fails.
#define SPECMOE_CUDA_TRY(call)                                                                         \
  do {                                                                                                 \
    cudaError_t const specmoe_err_ = (call);                                                           \
    SPECMOE_EXPECTS(specmoe_err_ == cudaSuccess, ::specmoe::errc::cuda, #call, " failed: ",            \
                    cudaGetErrorName(specmoe_err_), " (", cudaGetErrorString(specmoe_err_), ")");      \
  } while (0)
