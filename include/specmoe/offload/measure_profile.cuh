// specmoe/offload/measure_profile.cuh: measures the inputs of SP-MoE's latency model on the user's
// GPU and returns them as a prefetch::offload_profile (issue 7; nvcc only).
//
// What is measured, each the median of `repeats` timed runs after one warm-up:
//   - the link: pinned host-to-device copies of one expert block and of `batch_experts` adjacent
//     blocks as one copy; their difference gives the bandwidth, the rest the fixed cost per copy;
//   - per layer, the target's MoE compute for a verification of gamma + 1 tokens with every expert
//     resident: moe_layer<cuda_space>::forward_async between CUDA events, the layer's experts copied
//     to the device from the store (one layer at a time, so the GPU never holds them all);
//   - per layer, the dense part (attention) as a stand-in: two cuBLAS bf16 GEMMs of the attention
//     projections, [n, H] x [H, qkv_out] and [n, H] x [H, H] (the same for every layer);
//   - one draft pass: the caller's callable (a real dense forward of the draft on the same GPU).
// Accuracy (how often the draft names the experts verification needs) is not a GPU time: it comes
// from a trace (prefetch/latency_model.hpp) or the runtime's counters; `profile_options::accuracy`
// fills it, else it is left at 0.
#pragma once

#include <specmoe/core/bfloat16.hpp>
#include <specmoe/core/error.hpp>
#include <specmoe/core/expert_weights.hpp>
#include <specmoe/detail/scoped_stream.cuh>
#include <specmoe/layer/cuda_moe_layer.cuh>
#include <specmoe/offload/detail/cuda_try.cuh>
#include <specmoe/offload/host_expert_store.cuh>
#include <specmoe/prefetch/offload_profile.hpp>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace specmoe::offload {

/// @brief What measure_profile measures and how often.
struct profile_options {
  int gamma = 1;                 ///< draft tokens per verification (the target runs gamma + 1 tokens)
  double acceptance = 0.97;      ///< written to the profile as given (not measured)
  int repeats = 7;               ///< timed runs per figure (the median is kept)
  int batch_experts = 4;         ///< adjacent expert blocks in the batched-copy measurement
  std::int64_t attn_qkv_out = 0; ///< attention stand-in: columns of the QKV projection (0: 3 x hidden)
  std::vector<double> accuracy;  ///< [layers] draft accuracy from a trace, or empty (zeros)
  std::string model;             ///< free text for the profile
  std::uint64_t seed = 1;        ///< of the random verification inputs
};

namespace profile_detail {

/// Device buffer freed at scope end.
struct device_buffer {
  void* p = nullptr;
  explicit device_buffer(std::size_t bytes) { SPECMOE_CUDA_TRY(cudaMalloc(&p, std::max<std::size_t>(bytes, 1))); }
  device_buffer(device_buffer const&) = delete;
  device_buffer& operator=(device_buffer const&) = delete;
  ~device_buffer() { cudaFree(p); }
  template <class T>
  [[nodiscard]] T* as() const noexcept { return static_cast<T*>(p); }
};

/// Median microseconds of `repeats` runs of `enqueue(stream)` between two events (one warm-up).
class event_timer {
 public:
  explicit event_timer(cudaStream_t stream) : stream_(stream) {
    SPECMOE_CUDA_TRY(cudaEventCreate(&start_));
    if (cudaError_t const err = cudaEventCreate(&stop_); err != cudaSuccess) {
      cudaEventDestroy(start_);
      detail::throw_cuda(err, "cudaEventCreate");
    }
  }
  event_timer(event_timer const&) = delete;
  event_timer& operator=(event_timer const&) = delete;
  ~event_timer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  template <class Enqueue>
  double median_us(int repeats, Enqueue&& enqueue) {
    enqueue(stream_);
    SPECMOE_CUDA_TRY(cudaStreamSynchronize(stream_));
    std::vector<double> us;
    for (int i = 0; i < repeats; ++i) {
      SPECMOE_CUDA_TRY(cudaEventRecord(start_, stream_));
      enqueue(stream_);
      SPECMOE_CUDA_TRY(cudaEventRecord(stop_, stream_));
      SPECMOE_CUDA_TRY(cudaEventSynchronize(stop_));
      float ms = 0;
      SPECMOE_CUDA_TRY(cudaEventElapsedTime(&ms, start_, stop_));
      us.push_back(static_cast<double>(ms) * 1e3);
    }
    std::nth_element(us.begin(), us.begin() + static_cast<std::ptrdiff_t>(us.size() / 2), us.end());
    return us[us.size() / 2];
  }

 private:
  cudaStream_t stream_;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

}  // namespace profile_detail

/// @brief Measures an offload profile for `config` x `store.layers()` layers on the current GPU.
///
/// @param resident_parts per layer: router (and bias) and shared experts, device views (as for
///        offloaded_moe_stack); routed experts come from `store`.
/// @param draft_pass callable `void(cudaStream_t)` that enqueues one draft forward of one token
///        (all draft layers) on the stream it is given.
/// @return the profile, validated (prefetch::validate_profile).
/// @note Synchronises the device many times and allocates one layer's experts on the GPU
///       (E x expert_bytes); call it before serving, not between steps.
/// @throw specmoe::error invalid_argument / shape_mismatch for bad arguments, cuda on failures.
template <class DraftPass>
prefetch::offload_profile measure_profile(moe_config const& config, std::span<moe_weights<bf16> const> resident_parts,
                                          host_expert_store const& store, DraftPass&& draft_pass, profile_options const& options = {}) {
  config.validate();
  int const L = store.layers(), E = store.experts(), H = config.hidden_size;
  SPECMOE_EXPECTS(store.layout() == expert_layout::of(config, L), errc::shape_mismatch,
                  "measure_profile: the store's expert shape does not match the config");
  SPECMOE_EXPECTS(static_cast<int>(resident_parts.size()) == L, errc::shape_mismatch, "measure_profile: ", resident_parts.size(),
                  " layers of resident weights for a store of ", L, " layers");
  SPECMOE_EXPECTS(options.gamma >= 1 && options.repeats >= 1 && options.batch_experts >= 1, errc::invalid_argument,
                  "measure_profile: gamma, repeats and batch_experts must be >= 1");
  SPECMOE_EXPECTS(options.accuracy.empty() || static_cast<int>(options.accuracy.size()) == L, errc::shape_mismatch,
                  "measure_profile: accuracy has ", options.accuracy.size(), " entries for ", L, " layers");

  specmoe::detail::scoped_stream const owned_stream;
  cudaStream_t const stream = owned_stream.get();
  profile_detail::event_timer timer(stream);
  std::size_t const B = store.expert_bytes();

  prefetch::offload_profile p;
  int device = 0;
  cudaDeviceProp prop{};
  SPECMOE_CUDA_TRY(cudaGetDevice(&device));
  SPECMOE_CUDA_TRY(cudaGetDeviceProperties(&prop, device));
  p.device = prop.name;
  p.model = options.model;
  p.layers = L;
  p.experts = E;
  p.top_k = config.top_k;
  p.gamma = options.gamma;
  p.acceptance = options.acceptance;
  p.expert_bytes = static_cast<double>(B);

  // 1. the link: one block, and `batch` adjacent blocks as one copy
  int const batch = static_cast<int>(std::min<std::int64_t>(options.batch_experts, store.layout().total_experts()));
  {
    profile_detail::device_buffer dst(static_cast<std::size_t>(batch) * B);
    auto copy = [&](std::size_t bytes) {
      return [&, bytes](cudaStream_t s) {
        SPECMOE_CUDA_TRY(cudaMemcpyAsync(dst.p, store.data(), bytes, cudaMemcpyHostToDevice, s));
      };
    };
    double const one = timer.median_us(options.repeats, copy(B));
    double const many = batch > 1 ? timer.median_us(options.repeats, copy(static_cast<std::size_t>(batch) * B)) : one;
    if (batch > 1 && many > one) {
      p.link_bytes_per_us = static_cast<double>(batch - 1) * static_cast<double>(B) / (many - one);
      p.copy_latency_us = std::max(0.0, one - static_cast<double>(B) / p.link_bytes_per_us);
    } else {  // one block only, or noise: all of it counted as bandwidth
      p.link_bytes_per_us = static_cast<double>(batch) * static_cast<double>(B) / std::max(many, 1e-3);
      p.copy_latency_us = 0;
    }
  }

  // 2. per-layer expert compute, all of the layer's experts resident (copied from the store)
  auto const n = static_cast<std::int64_t>(options.gamma) + 1;
  std::vector<bf16> x_host(static_cast<std::size_t>(n * H));
  {
    std::mt19937_64 rng(options.seed);
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    for (auto& v : x_host) v = bf16(d(rng));
  }
  profile_detail::device_buffer x(x_host.size() * sizeof(bf16)), out(x_host.size() * sizeof(bf16));
  SPECMOE_CUDA_TRY(cudaMemcpyAsync(x.p, x_host.data(), x_host.size() * sizeof(bf16), cudaMemcpyHostToDevice, stream));
  SPECMOE_CUDA_TRY(cudaStreamSynchronize(stream));
  {
    profile_detail::device_buffer experts(static_cast<std::size_t>(E) * B);
    auto const& lay = store.layout();
    auto const block_elems = static_cast<std::int64_t>(B / sizeof(bf16));
    auto const F = config.ffn_size;
    for (int l = 0; l < L; ++l) {
      SPECMOE_CUDA_TRY(cudaMemcpy(experts.p, store.expert(l, 0), static_cast<std::size_t>(E) * B, cudaMemcpyHostToDevice));
      auto w = resident_parts[static_cast<std::size_t>(l)];
      auto const* base = experts.as<bf16>();
      auto const gate_off = static_cast<std::int64_t>(lay.gate_offset() / sizeof(bf16));
      auto const up_off = static_cast<std::int64_t>(lay.up_offset() / sizeof(bf16));
      auto const down_off = static_cast<std::int64_t>(lay.down_offset() / sizeof(bf16));
      w.experts.gate = {base + gate_off, E, F, H, block_elems, H};
      w.experts.up = {base + up_off, E, F, H, block_elems, H};
      w.experts.down = {base + down_off, E, H, F, block_elems, F};
      auto cfg = config;
      cfg.layer = l;
      moe_layer<cuda_space> layer(cfg, w, {}, cuda_layer_options{.max_tokens = n});
      cuda_batch const in{matrix_view<bf16 const>(x.as<bf16>(), n, H)};
      matrix_view<bf16> const o(out.as<bf16>(), n, H);
      p.moe_us.push_back(timer.median_us(options.repeats, [&](cudaStream_t s) { layer.forward_async(in, o, s); }));
      layer.check(stream);
    }
  }

  // 3. the attention stand-in: QKV and output projections of the verification tokens
  {
    std::int64_t const qkv = options.attn_qkv_out > 0 ? options.attn_qkv_out : 3 * static_cast<std::int64_t>(H);
    profile_detail::device_buffer w_qkv(static_cast<std::size_t>(qkv * H) * 2), w_o(static_cast<std::size_t>(H) * H * 2),
        y(static_cast<std::size_t>(n * qkv) * 2);
    // 0x3c3c is a small finite bf16: the values do not change the timing
    SPECMOE_CUDA_TRY(cudaMemsetAsync(w_qkv.p, 0x3c, static_cast<std::size_t>(qkv * H) * 2, stream));
    SPECMOE_CUDA_TRY(cudaMemsetAsync(w_o.p, 0x3c, static_cast<std::size_t>(H) * H * 2, stream));
    cublasHandle_t handle = nullptr;
    SPECMOE_EXPECTS(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS, errc::cuda, "measure_profile: cublasCreate failed");
    struct handle_guard {
      cublasHandle_t h;
      ~handle_guard() { cublasDestroy(h); }
    } const hg{handle};
    SPECMOE_EXPECTS(cublasSetStream(handle, stream) == CUBLAS_STATUS_SUCCESS, errc::cuda, "measure_profile: cublasSetStream failed");
    float const one = 1.0f, zero = 0.0f;
    auto gemm = [&](void const* w, void const* a, void* c, std::int64_t rows_out) {
      // C^T [rows_out, n] (column-major) = W [rows_out, H] . A^T
      cublasStatus_t const st = cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(rows_out), static_cast<int>(n), H,
                                             &one, w, CUDA_R_16BF, H, a, CUDA_R_16BF, H, &zero, c, CUDA_R_16BF,
                                             static_cast<int>(rows_out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      SPECMOE_EXPECTS(st == CUBLAS_STATUS_SUCCESS, errc::cuda, "measure_profile: cublasGemmEx (attention stand-in) failed: ",
                      cublasGetStatusName(st));
    };
    double const attn = timer.median_us(options.repeats, [&](cudaStream_t) {
      gemm(w_qkv.p, x.p, y.p, qkv);
      gemm(w_o.p, x.p, out.p, H);
    });
    p.attn_us.assign(static_cast<std::size_t>(L), attn);
  }

  // 4. one draft pass (the caller's dense forward)
  p.draft_pass_us = timer.median_us(options.repeats, [&](cudaStream_t s) { draft_pass(s); });

  p.accuracy = options.accuracy.empty() ? std::vector<double>(static_cast<std::size_t>(L), 0.0) : options.accuracy;
  prefetch::validate_profile(p, "measure_profile");
  return p;
}

}  // namespace specmoe::offload
