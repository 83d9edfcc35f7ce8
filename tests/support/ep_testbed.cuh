// tests/support/ep_testbed.cuh: what the multi-rank GPU tests share — one thread per rank, ranks
// sharing a GPU when there are fewer GPUs than ranks, device buffers owned by rank threads, each
// rank's slice of the weights, and the errors a rank thread caught.
#pragma once

#include "support/cuda_testbed.cuh"

#include <specmoe/core/cuda_error.cuh>
#include <specmoe/core/error.hpp>
#include <specmoe/core/expert_weights.hpp>
#include <specmoe/core/moe_config.hpp>

#include <cuda_runtime.h>

#include <cstdlib>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace specmoe::test {

// Ranks that share one GPU spin-wait on each other's kernels, so nothing may queue one rank's
// kernel behind another's: CUDA's lazy module loading (a first launch waits for the running
// kernels) and streams sharing one of the device's hardware queues (8 by default) both would.
// Load eagerly, use 32 queues, and make the ranks' streams one after another (set before the first
// CUDA call; the environment wins).
inline int const eager_loading = setenv("CUDA_MODULE_LOADING", "EAGER", 0);
inline int const hardware_queues = setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);

inline int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

// Plain device memory owned by a rank thread (no Catch2 macros off the main thread).
template <class T>
struct dev_buf {
  T* p = nullptr;
  std::size_t n = 0;
  explicit dev_buf(std::vector<T> const& h) : n(h.size()) {
    SPECMOE_CUDA_TRY(cudaMalloc(&p, std::max<std::size_t>(1, n) * sizeof(T)));
    if (n) SPECMOE_CUDA_TRY(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  dev_buf(std::size_t count, unsigned char fill) : n(count) {
    SPECMOE_CUDA_TRY(cudaMalloc(&p, std::max<std::size_t>(1, n) * sizeof(T)));
    SPECMOE_CUDA_TRY(cudaMemset(p, fill, n * sizeof(T)));
  }
  dev_buf(dev_buf const&) = delete;
  ~dev_buf() { cudaFree(p); }
  std::vector<T> host() const {
    std::vector<T> h(n);
    if (n) SPECMOE_CUDA_TRY(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

// One rank's weights on its device: the router, shared experts, and its own routed experts.
struct rank_weights {
  std::vector<std::unique_ptr<dev_buf<bf16>>> keep;
  std::unique_ptr<dev_buf<float>> bias;
  moe_weights<bf16> views;

  rank_weights(moe_config const& cfg, moe_weights<bf16> const& host, std::span<int const> local) : views(host) {
    auto up = [&](std::vector<bf16> const& v) -> bf16 const* {
      keep.push_back(std::make_unique<dev_buf<bf16>>(v));
      return keep.back()->p;
    };
    auto slice = [&](expert_tensor<bf16> const& t, std::span<int const> experts) {
      std::vector<bf16> v;
      for (int e : experts)
        for (std::int64_t r = 0; r < t.rows; ++r)
          for (std::int64_t c = 0; c < t.cols; ++c) v.push_back(t[e](r, c));
      auto out = expert_tensor<bf16>::packed(nullptr, static_cast<std::int64_t>(experts.size()), t.rows, t.cols);
      out.data = up(v);
      return out;
    };
    auto const H = cfg.hidden_size;
    std::vector<bf16> router(host.router.weight.data, host.router.weight.data + cfg.num_experts * H);
    views.router.weight = matrix_view<bf16 const>(up(router), cfg.num_experts, H);
    views.experts = {slice(host.experts.gate, local), slice(host.experts.up, local), slice(host.experts.down, local)};
    std::vector<int> all_shared(static_cast<std::size_t>(cfg.num_shared_experts));
    for (int s = 0; s < cfg.num_shared_experts; ++s) all_shared[static_cast<std::size_t>(s)] = s;
    if (cfg.num_shared_experts > 0)
      views.shared = {slice(host.shared.gate, all_shared), slice(host.shared.up, all_shared),
                      slice(host.shared.down, all_shared)};
  }
};

inline std::string error_text(std::exception_ptr const& e) {
  if (!e) return "no error";
  try {
    std::rethrow_exception(e);
  } catch (std::exception const& x) {
    return x.what();
  }
}

inline std::optional<errc> error_code(std::exception_ptr const& e) {
  if (!e) return std::nullopt;
  try {
    std::rethrow_exception(e);
  } catch (specmoe::error const& x) {
    return x.code();
  } catch (...) {
    return errc::internal;
  }
}

}  // namespace specmoe::test
