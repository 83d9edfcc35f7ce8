// specmoe/router/device_layer_affinity.cuh: Speculative MoE's inter-layer predictors on the GPU
// (nvcc only), for the multi-rank cuda layer's forward_tp_async:
//
//   device_layer_affinity     A: the plan's next rank after the ranks that served each token at the
//                             two previous layers (a 2-gram), with confidence A_p;
//   device_combined_affinity  T and A, the guess with the higher confidence (the paper's rule).
//
// The previous layers' serving ranks live in a `device_rank_history` that the layers of one model
// share on each rank: every layer's forward_tp_async computes, for the tokens of its shard, the
// rank that held most of their experts, and its shuffled all-gather carries that int along with
// each token's output row, so every rank ends with the ranks of all T tokens (4 bytes a token on
// top of hidden x 2). The layers must run in order on one stream, the same batch through all.
// Guesses equal the host predictors' (router/affinity_predictors.hpp) for the same routing.
#pragma once

#include <specmoe/core/cuda_error.cuh>
#include <specmoe/core/error.hpp>
#include <specmoe/grouping/speculative_plan.hpp>
#include <specmoe/router/affinity_predictors.hpp>
#include <specmoe/router/concepts.hpp>
#include <specmoe/router/device_token_affinity.cuh>

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace specmoe {

namespace kernels {

/// Per token: no guess, then T where its confidence is above the current one (when `rank_plus_one`
/// is given), then A where its confidence is above that (when both history rows are given) — the
/// host rule of history_affinity_prediction, in the same order.
static __global__ void affinity_guess_kernel(std::int32_t const* __restrict__ token_ids, long long n,
                                             std::uint8_t const* __restrict__ rank_plus_one,
                                             float const* __restrict__ token_conf, long long vocab,
                                             std::int32_t const* __restrict__ before_last,
                                             std::int32_t const* __restrict__ last, int D,
                                             std::int32_t const* __restrict__ ngram_rank,
                                             float const* __restrict__ ngram_conf, std::int32_t* __restrict__ rank,
                                             float* __restrict__ conf) {
  long long const t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n) return;
  int r = -1;
  float c = 0.0f;
  if (rank_plus_one != nullptr && token_ids != nullptr) {
    long long const id = token_ids[t];
    int const tr = id >= 0 && id < vocab ? static_cast<int>(rank_plus_one[id]) - 1 : -1;
    if (tr >= 0 && token_conf[id] > c) {
      r = tr;
      c = token_conf[id];
    }
  }
  if (before_last != nullptr && last != nullptr) {
    int const a = before_last[t], b = last[t];
    if (a >= 0 && a < D && b >= 0 && b < D) {
      int const ar = ngram_rank[a * D + b];
      float const ac = ngram_conf[a * D + b];
      if (ar >= 0 && ac > c) {
        r = ar;
        c = ac;
      }
    }
  }
  rank[t] = r;
  conf[t] = c;
}

}  // namespace kernels

/// @brief The rank that served each token at each layer of the last batch, on the device (one
/// per rank, shared by the model's layers): the history the inter-layer predictors read.
///
/// Recording is host-ordered: a layer's forward_tp_async names where its all-gather writes the
/// ranks (`record`) at enqueue time, and the next layers' guesses read them on the same stream.
/// A layer whose rows were recorded for another token count gives no history (no A guesses).
class device_rank_history {
 public:
  /// @param layers the model's MoE layers; @param max_tokens the most tokens (T, all ranks) a batch carries.
  device_rank_history(int layers, std::int64_t max_tokens)
      : layers_(layers), max_tokens_(max_tokens), tokens_(static_cast<std::size_t>(layers > 0 ? layers : 0), -1),
        host_(std::make_shared<rank_history>()) {
    SPECMOE_EXPECTS(layers > 0 && max_tokens > 0, errc::invalid_argument, "device_rank_history needs layers > 0 and max_tokens > 0, got ",
                    layers, " and ", max_tokens);
    SPECMOE_CUDA_TRY(cudaMalloc(&ranks_, static_cast<std::size_t>(layers) * static_cast<std::size_t>(max_tokens) * 4));
  }
  device_rank_history(device_rank_history const&) = delete;
  device_rank_history& operator=(device_rank_history const&) = delete;
  ~device_rank_history() {
    if (ranks_) cudaFree(ranks_);
  }

  [[nodiscard]] int layers() const noexcept { return layers_; }
  [[nodiscard]] std::int64_t max_tokens() const noexcept { return max_tokens_; }

  /// Where `layer` writes the serving ranks of its T tokens [T] (device); marks the layer recorded for T.
  std::int32_t* record(int layer, std::int64_t T) {
    SPECMOE_EXPECTS(layer >= 0 && layer < layers_, errc::invalid_argument, "device_rank_history holds layers [0, ", layers_,
                    "), asked to record layer ", layer);
    SPECMOE_EXPECTS(T >= 0 && T <= max_tokens_, errc::invalid_argument, "device_rank_history holds ", max_tokens_,
                    " tokens a layer, the batch has ", T);
    tokens_[static_cast<std::size_t>(layer)] = T;
    return slot(layer);
  }
  /// The ranks recorded for `layer` if they cover T tokens, else null (device).
  [[nodiscard]] std::int32_t const* at(int layer, std::int64_t T) const noexcept {
    if (layer < 0 || layer >= layers_ || tokens_[static_cast<std::size_t>(layer)] != T) return nullptr;
    return slot(layer);
  }

  /// The host side (the same predictors' predict/observe on the host layer and the simulator).
  [[nodiscard]] std::shared_ptr<rank_history> const& host() const noexcept { return host_; }

 private:
  std::int32_t* slot(int layer) const noexcept { return ranks_ + static_cast<std::size_t>(layer) * static_cast<std::size_t>(max_tokens_); }

  int layers_ = 0;
  std::int64_t max_tokens_ = 0;
  std::vector<std::int64_t> tokens_;
  std::shared_ptr<rank_history> host_;
  std::int32_t* ranks_ = nullptr;
};

/// @brief RouterPredictor for the GPU layer: A (and, with `UseTokens`, T too) of one layer of a
/// plan, reading the serving ranks of the two previous layers from a shared device_rank_history.
/// The multi-rank layer sees `served_ranks_target` and records its own layer's ranks there.
template <bool UseTokens>
class device_history_affinity {
 public:
  static constexpr bool predicts = true;
  static constexpr bool on_device = true;

  /// @param layer this MoE layer's index (its config.layer); @param vocab as device_token_affinity.
  device_history_affinity(std::shared_ptr<grouping::speculative_plan const> plan, int layer,
                          std::shared_ptr<device_rank_history> history, std::int64_t vocab = 0)
      : plan_(std::move(plan)), history_(std::move(history)), layer_(layer), t_(std::make_shared<tables>()) {
    SPECMOE_EXPECTS(plan_ && history_, errc::invalid_argument,
                    "device_history_affinity needs a plan and a shared device_rank_history");
    SPECMOE_EXPECTS(layer >= 0 && layer < plan_->layers && layer < history_->layers(), errc::invalid_argument, "layer ", layer,
                    " is outside the plan's ", plan_->layers, " layers or the history's ", history_->layers());
    auto const& L = plan_->per_layer[static_cast<std::size_t>(layer)];
    auto const D = static_cast<std::size_t>(plan_->ranks);
    if constexpr (UseTokens) t_->tokens.emplace(L, vocab);
    if (!L.ngram_rank.empty()) {
      SPECMOE_EXPECTS(L.ngram_rank.size() == D * D && L.ngram_confidence.size() == D * D, errc::invalid_argument,
                      "plan layer ", layer, " has a 2-gram table of ", L.ngram_rank.size(), " entries for ", D, " ranks");
      SPECMOE_CUDA_TRY(cudaMalloc(&t_->ngram_rank, D * D * 4));
      SPECMOE_CUDA_TRY(cudaMalloc(&t_->ngram_conf, D * D * 4));
      std::vector<std::int32_t> const ranks(L.ngram_rank.begin(), L.ngram_rank.end());
      SPECMOE_CUDA_TRY(cudaMemcpy(t_->ngram_rank, ranks.data(), D * D * 4, cudaMemcpyHostToDevice));
      SPECMOE_CUDA_TRY(cudaMemcpy(t_->ngram_conf, L.ngram_confidence.data(), D * D * 4, cudaMemcpyHostToDevice));
    }
  }

  [[nodiscard]] int layer() const noexcept { return layer_; }
  [[nodiscard]] int ranks() const noexcept { return plan_->ranks; }

  /// Enqueues the guesses of n tokens: rank [n] (-1: none) and confidence [n], device memory.
  void predict_async(std::int32_t const* token_ids, std::int64_t n, std::int32_t* rank, float* confidence,
                     cudaStream_t stream) const {
    if (n == 0) return;
    std::uint8_t const* rank_plus_one = nullptr;
    float const* token_conf = nullptr;
    std::int64_t vocab = 0;
    if constexpr (UseTokens) {
      rank_plus_one = t_->tokens->device_rank_plus_one();
      token_conf = t_->tokens->device_confidence();
      vocab = t_->tokens->vocab();
    }
    std::int32_t const* before_last = t_->ngram_rank ? history_->at(layer_ - 2, n) : nullptr;
    std::int32_t const* last = t_->ngram_rank ? history_->at(layer_ - 1, n) : nullptr;
    auto const blocks = static_cast<unsigned>((n + 255) / 256);
    kernels::affinity_guess_kernel<<<blocks, 256, 0, stream>>>(token_ids, n, rank_plus_one, token_conf, vocab, before_last, last,
                                                               plan_->ranks, t_->ngram_rank, t_->ngram_conf, rank, confidence);
    SPECMOE_CUDA_TRY(cudaGetLastError());
  }

  /// Where the layer's all-gather writes this layer's serving ranks of n tokens (device).
  [[nodiscard]] std::int32_t* served_ranks_target(std::int64_t n) { return history_->record(layer_, n); }

  /// The same guesses on the host (RouterPredictor, for the host layer and the simulator), over
  /// the history's host side.
  void predict(prediction_request const& req, prediction& out) { host().predict(req, out); }
  void observe(routing_observation const& o) { host().observe(o); }

 private:
  history_affinity_prediction<UseTokens> host() const { return {plan_, history_->host()}; }

  struct tables {
    std::optional<device_token_affinity> tokens;
    std::int32_t* ngram_rank = nullptr;
    float* ngram_conf = nullptr;
    tables() = default;
    tables(tables const&) = delete;
    tables& operator=(tables const&) = delete;
    ~tables() {
      if (ngram_rank) cudaFree(ngram_rank);
      if (ngram_conf) cudaFree(ngram_conf);
    }
  };
  std::shared_ptr<grouping::speculative_plan const> plan_;
  std::shared_ptr<device_rank_history> history_;
  int layer_ = 0;
  std::shared_ptr<tables> t_;
};

/// A on the device: the 2-gram over the two previous layers' serving ranks.
using device_layer_affinity = device_history_affinity<false>;
/// T and A on the device: per token, the guess with the higher confidence.
using device_combined_affinity = device_history_affinity<true>;

static_assert(router_predictor<device_layer_affinity>);
static_assert(router_predictor<device_combined_affinity>);

}  // namespace specmoe
