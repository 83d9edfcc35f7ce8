// specmoe/offload/detail/cuda_try.cuh: CUDA error checks of the offload runtime (internal):
// SPECMOE_CUDA_TRY (core/cuda_error.cuh) and failures carried over from the worker thread.
#pragma once

#include <specmoe/core/cuda_error.cuh>
#include <specmoe/core/error.hpp>

#include <cuda_runtime.h>

namespace specmoe::offload::detail {

/// Throws specmoe::error{errc::cuda} for a failure `what` reported from somewhere else (the
/// prefetcher's worker thread), with the call's name and CUDA's message.
[[noreturn]] inline void throw_cuda(cudaError_t err, char const* what) {
  SPECMOE_FAIL(errc::cuda, what, " failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
}

}  // namespace specmoe::offload::detail
