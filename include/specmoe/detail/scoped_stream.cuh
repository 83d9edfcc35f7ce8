// specmoe/detail/scoped_stream.cuh: a non-blocking CUDA stream owned by a scope, for setup work
// kept off the caller's stream (and off the legacy stream, which would wait for every other one).
#pragma once

#include <specmoe/core/cuda_error.cuh>

#include <cuda_runtime.h>

namespace specmoe::detail {

class scoped_stream {
 public:
  scoped_stream() { SPECMOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  ~scoped_stream() {
    if (stream_) cudaStreamDestroy(stream_);
  }
  scoped_stream(scoped_stream const&) = delete;
  scoped_stream& operator=(scoped_stream const&) = delete;

  [[nodiscard]] cudaStream_t get() const noexcept { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

}  // namespace specmoe::detail
