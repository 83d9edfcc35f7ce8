// specmoe/router/device_token_affinity.cuh: Speculative MoE's token-affinity predictor on the GPU
// (nvcc only) — T and T_p of one layer of a plan (grouping/speculative_plan.hpp) as a dense device
// table by vocabulary id, looked up per token in one kernel, for the multi-rank cuda layer's
// forward_tp_async. The host predictor (router/affinity_predictors.hpp) gives the same guesses.
#pragma once

#include <specmoe/core/cuda_error.cuh>
#include <specmoe/core/error.hpp>
#include <specmoe/grouping/speculative_plan.hpp>
#include <specmoe/router/concepts.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

namespace specmoe {

namespace kernels {

/// Guess per token: table[id] = rank + 1 (0: unknown id) and its confidence; ids outside the
/// table get no guess (-1).
static __global__ void token_affinity_lookup_kernel(std::int32_t const* __restrict__ token_ids, long long n,
                                                    std::uint8_t const* __restrict__ rank_plus_one,
                                                    float const* __restrict__ confidence, long long vocab,
                                                    std::int32_t* __restrict__ rank, float* __restrict__ conf) {
  long long const t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n) return;
  long long const id = token_ids[t];
  int const r = id >= 0 && id < vocab ? static_cast<int>(rank_plus_one[id]) - 1 : -1;
  rank[t] = r;
  conf[t] = r >= 0 ? confidence[id] : 0.0f;
}

}  // namespace kernels

/// @brief RouterPredictor for the GPU layer: the plan's token table T (rank per vocabulary id)
/// with its confidence T_p. Ids the plan never saw, and ids outside [0, vocab), get no guess.
///
/// Device tables of 5 bytes per vocabulary id (a 150k vocabulary: 750 KB per layer), uploaded
/// once; copies share them (one per layer of a model).
class device_token_affinity {
 public:
  static constexpr bool predicts = true;
  static constexpr bool on_device = true;

  /// @param layer the plan's layer for this MoE layer; @param vocab ids [0, vocab) get a slot
  ///        (0: the largest id the plan knows, plus one).
  explicit device_token_affinity(grouping::plan_layer const& layer, std::int64_t vocab = 0)
      : t_(std::make_shared<tables>()) {
    SPECMOE_EXPECTS(layer.token_ids.size() == layer.token_rank.size() && layer.token_ids.size() == layer.token_confidence.size(),
                    errc::invalid_argument, "plan layer has ", layer.token_ids.size(), " token ids, ", layer.token_rank.size(),
                    " ranks and ", layer.token_confidence.size(), " confidences");
    std::int64_t const known = layer.token_ids.empty() ? 0 : static_cast<std::int64_t>(layer.token_ids.back()) + 1;
    t_->vocab = vocab > 0 ? vocab : known;
    auto const V = static_cast<std::size_t>(std::max<std::int64_t>(t_->vocab, 1));
    std::vector<std::uint8_t> rank(V, 0);
    std::vector<float> conf(V, 0.0f);
    for (std::size_t i = 0; i < layer.token_ids.size(); ++i) {
      auto const id = layer.token_ids[i];
      if (id < 0 || id >= t_->vocab) continue;
      SPECMOE_EXPECTS(layer.token_rank[i] >= 0 && layer.token_rank[i] < 255, errc::invalid_argument, "plan token ", id,
                      " has rank ", layer.token_rank[i]);
      rank[static_cast<std::size_t>(id)] = static_cast<std::uint8_t>(layer.token_rank[i] + 1);
      conf[static_cast<std::size_t>(id)] = layer.token_confidence[i];
    }
    t_->host_rank = rank;
    t_->host_confidence = conf;
    SPECMOE_CUDA_TRY(cudaMalloc(&t_->rank_plus_one, V));
    SPECMOE_CUDA_TRY(cudaMalloc(&t_->confidence, V * sizeof(float)));
    SPECMOE_CUDA_TRY(cudaMemcpy(t_->rank_plus_one, rank.data(), V, cudaMemcpyHostToDevice));
    SPECMOE_CUDA_TRY(cudaMemcpy(t_->confidence, conf.data(), V * sizeof(float), cudaMemcpyHostToDevice));
  }

  [[nodiscard]] std::int64_t vocab() const noexcept { return t_->vocab; }
  /// The device tables: rank + 1 (0: unknown) and confidence per vocabulary id [vocab].
  [[nodiscard]] std::uint8_t const* device_rank_plus_one() const noexcept { return t_->rank_plus_one; }
  [[nodiscard]] float const* device_confidence() const noexcept { return t_->confidence; }

  /// Enqueues the guesses of n tokens: rank [n] (-1: none) and confidence [n], device memory.
  void predict_async(std::int32_t const* token_ids, std::int64_t n, std::int32_t* rank, float* confidence,
                     cudaStream_t stream) const {
    if (n == 0) return;
    SPECMOE_EXPECTS(token_ids != nullptr, errc::invalid_argument,
                    "device_token_affinity needs the batch's token ids (cuda_tp_batch::token_ids)");
    auto const blocks = static_cast<unsigned>((n + 255) / 256);
    kernels::token_affinity_lookup_kernel<<<blocks, 256, 0, stream>>>(token_ids, n, t_->rank_plus_one, t_->confidence,
                                                                      t_->vocab, rank, confidence);
    SPECMOE_CUDA_TRY(cudaGetLastError());
  }

  /// The same guesses on the host (RouterPredictor, for the host layer and the simulator).
  void predict(prediction_request const& req, prediction& out) const {
    out.reset(req.num_tokens, 0);
    out.confidence.assign(static_cast<std::size_t>(req.num_tokens), 0.0f);
    for (std::size_t t = 0; t < req.token_ids.size() && t < out.rank.size(); ++t) {
      auto const id = req.token_ids[t];
      if (id < 0 || id >= t_->vocab) continue;
      out.rank[t] = static_cast<int>(t_->host_rank[static_cast<std::size_t>(id)]) - 1;
      if (out.rank[t] >= 0) out.confidence[t] = t_->host_confidence[static_cast<std::size_t>(id)];
    }
  }
  void observe(routing_observation const&) {}  // (a plan's table: nothing to learn online)

 private:
  struct tables {
    std::int64_t vocab = 0;
    std::vector<std::uint8_t> host_rank;
    std::vector<float> host_confidence;
    std::uint8_t* rank_plus_one = nullptr;
    float* confidence = nullptr;
    tables() = default;
    tables(tables const&) = delete;
    tables& operator=(tables const&) = delete;
    ~tables() {
      if (rank_plus_one) cudaFree(rank_plus_one);
      if (confidence) cudaFree(confidence);
    }
  };
  std::shared_ptr<tables> t_;
};

static_assert(router_predictor<device_token_affinity>);

}  // namespace specmoe
