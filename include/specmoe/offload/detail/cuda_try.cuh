// specmoe/offload/detail/cuda_try.cuh: CUDA error checks of the offload runtime (internal).
#pragma once

#include <specmoe/core/error.hpp>

#include <cuda_runtime.h>

/// Throws specmoe::error{errc::cuda} naming the call when a CUDA runtime call fails. (The layer's
/// SPECMOE_CUDA_TRY lives in layer/cuda_moe_layer.cuh, which the runtime does not need.)
#define SPECMOE_OFFLOAD_CUDA_TRY(call)                                                                 \
  do {                                                                                                 \
    cudaError_t const specmoe_offload_err_ = (call);                                                   \
    SPECMOE_EXPECTS(specmoe_offload_err_ == cudaSuccess, ::specmoe::errc::cuda, #call, " failed: ",    \
                    cudaGetErrorName(specmoe_offload_err_), " (", cudaGetErrorString(specmoe_offload_err_), ")"); \
  } while (0)

namespace specmoe::offload::detail {

/// Throws specmoe::error{errc::cuda} for a failure `what` reported from somewhere else (the
/// prefetcher's worker thread), with the call's name and CUDA's message.
[[noreturn]] inline void throw_cuda(cudaError_t err, char const* what) {
  SPECMOE_FAIL(errc::cuda, what, " failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
}

}  // namespace specmoe::offload::detail
