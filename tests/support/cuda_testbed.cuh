// tests/support/cuda_testbed.cuh: device buffers and checks for GPU tests.
#pragma once

#include "catch.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#define SPECMOE_TEST_CUDA(call)                                                         \
  do {                                                                                  \
    cudaError_t const err_ = (call);                                                    \
    INFO(#call << " -> " << cudaGetErrorString(err_));                                  \
    REQUIRE(err_ == cudaSuccess);                                                       \
  } while (0)

namespace specmoe::test {

// Norm-wise relative error per token under 1e-2, no NaN (bf16 or fp32 activations).
template <class T>
void require_close(std::vector<T> const& got, std::vector<T> const& want, std::int64_t n, int H) {
  double worst = 0;
  for (std::int64_t t = 0; t < n; ++t) {
    double num = 0, den = 0;
    for (int c = 0; c < H; ++c) {
      double const a = static_cast<float>(got[static_cast<std::size_t>(t * H + c)]);
      double const b = static_cast<float>(want[static_cast<std::size_t>(t * H + c)]);
      REQUIRE(std::isfinite(a));
      num += (a - b) * (a - b);
      den += b * b;
    }
    worst = std::max(worst, std::sqrt(num / std::max(den, 1e-30)));
  }
  INFO("worst per-token relative error " << worst);
  REQUIRE(worst < 1e-2);
}

/// A device copy of a host vector (or `n` elements filled with the byte `fill`), freed at scope end.
template <class T>
class device_vector {
 public:
  explicit device_vector(std::vector<T> const& host) : n_(host.size()) {
    SPECMOE_TEST_CUDA(cudaMalloc(&p_, bytes()));
    SPECMOE_TEST_CUDA(cudaMemcpy(p_, host.data(), bytes(), cudaMemcpyHostToDevice));
  }
  device_vector(std::size_t n, unsigned char fill) : n_(n) {
    SPECMOE_TEST_CUDA(cudaMalloc(&p_, bytes() ? bytes() : 1));
    SPECMOE_TEST_CUDA(cudaMemset(p_, fill, bytes()));
  }
  device_vector(device_vector const&) = delete;
  device_vector& operator=(device_vector const&) = delete;
  ~device_vector() { cudaFree(p_); }

  [[nodiscard]] T* data() const noexcept { return p_; }
  [[nodiscard]] std::size_t size() const noexcept { return n_; }
  [[nodiscard]] std::size_t bytes() const noexcept { return n_ * sizeof(T); }
  [[nodiscard]] std::vector<T> to_host() const {
    std::vector<T> h(n_);
    SPECMOE_TEST_CUDA(cudaMemcpy(h.data(), p_, bytes(), cudaMemcpyDeviceToHost));
    return h;
  }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace specmoe::test
